"""Model-Agnostic Meta-Learning (Finn et al. 2017): meta-learn initial parameters from which a few SGD steps on
an episode's support set classify its queries well. The outer loss is the query cross-entropy of the adapted
parameters, differentiated through the inner SGD steps (second order), or with the adapted parameters' dependence
on the meta-parameters taken as the identity (``first_order``: FOMAML).

The network is the recipe's backbone (conv4-strided is MAML's Omniglot network) plus a linear head of ``way``
outputs on the feature maps averaged over space (or flattened: ``head_input``); see fsltool.methods.adaptation for
the head's zero initialisation, the BatchNorm modes (``transductive_bn``) and how a meta-batch's tasks run together
(one grouped network for a chain backbone such as conv4-strided, per-task passes of the module's own forward
otherwise).
Meta-training runs a meta-batch as ``method_options.step`` says: ``grouped`` (the default: several tasks per
pass, the fastest) or ``lean`` (one task at a time, each task's graphs freed before the next: the least memory);
both compute the same meta-gradient (tested). A backbone that is no chain runs one task at a time in either.

MAML++ (Antoniou et al. 2019, "How to train your MAML"), as options, each usable alone and off by default. The
details follow the authors' code, AntreasAntoniou/HowToTrainYourMAMLPytorch: few_shot_learning_system.py
(``get_per_step_loss_importance_vector``, ``forward``, ``train_forward_prop``), inner_loop_optimizers.py
(``LSLRGradientDescentLearningRule``), meta_neural_network_architectures.py (``MetaBatchNormLayer``) and
experiment_config/omniglot_maml++-*.json.

- ``multi_step_loss`` (MSL): the outer loss is sum_i w_i L_i, L_i the query loss after inner step i. The weights
  start at 1/N each (N = inner_steps) and move linearly towards the last step: meta-step k (0-based) gives the
  others max(1/N - k d, 0.03/N) and the last min(1/N + k (N-1) d, 1 - (N-1) 0.03/N), d = 1 / (N
  ``multi_step_loss_epochs``). From meta-step ``multi_step_loss_epochs`` on, the last step's loss alone. The
  reference evaluates the same formula at the epoch index, so its weights move once per epoch (500 meta-steps in
  its Omniglot configs, 10 epochs of annealing); here they move every meta-step along the same line
  (``multi_step_loss_epochs: 5000`` is the reference's schedule). Evaluation and validation losses: the last step.
- ``per_step_bn``: every BatchNorm layer has one scale, shift and set of running statistics per inner step:
  step 0's are the backbone's own layers (what export ships), steps 1..N-1 are copies in ``step_norms``. They
  are meta-parameters, not adapted in the inner loop (the reference's ``enable_inner_loop_optimizable_bn_params:
  false``). The query pass after step i uses step i's set, as the reference does. Running statistics are tracked
  per step on training support passes (the reference also folds in its query passes); like the reference, which
  calls batch_norm with training=True throughout, no pass normalises with them: they serve the exported body.
- ``learn_inner_lr`` (LSLR): one learned inner learning rate per adapted parameter tensor and per step,
  initialised to ``inner_lr``: every tensor without per_step_bn or ``adapt_norms: false``, the convolutions and the
  head with either (the reference: every parameter but BatchNorm's). Unconstrained, as in the reference.
- ``first_order_until: K``: first order for meta-steps 0..K-1, second order from meta-step K on (the reference's
  ``first_order_to_second_order_epoch``, in epochs; its Omniglot configs use -1: second order throughout).

``adapt_norms: false`` keeps the BatchNorm scales and shifts out of the inner loop: meta-learned by the outer loop
alone, the same at every inner step, as in MAML's reference code (cbfinn/maml, whose inner loop differentiates the
``weights`` dict, which holds no BatchNorm variable). The default adapts them, except with per_step_bn (MAML++'s
reference leaves them out of the inner loop too), which implies false.

Proto-MAML (Triantafillou et al. 2020, "Meta-Dataset"), as ``head_init: prototypes``: each task's inner loop starts
its head at the support set's class means under the body (prototype_head: logits 2 c_k.f - |c_k|^2, ProtoNet's
softmax) instead of the shared zero-initialised head, which then goes unused. The head's start keeps its graph to
the body in either order, so first-order MAML with it is fo-Proto-MAML. It lets a body pretrained for ProtoNet start
every episode at ProtoNet's accuracy at any way, where a zero head needs its inner steps to build a classifier.

MSL and derivative-order annealing read ``meta_steps_done``, a buffer of the state_dict advanced by every
training meta_step, so a resumed run continues both schedules exactly; it exists only when one of them is on (a
plain MAML state_dict is unchanged). Per-step BatchNorm and LSLR learn one set per training step, so they refuse
a ``test_inner_steps`` above ``inner_steps``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fsltool.data.episodes import Episode, stack_episodes
from fsltool.device import WorkSizes, work_sizes
from fsltool.methods.adaptation import (
    AdaptiveMethod,
    NormOverride,
    Params,
    batch_norm_layers,
    chain_layers,
    head_logits,
    inputs_for_autograd,
    prototype_head,
    require_bool,
    require_positive_float,
    task_losses,
)
from fsltool.methods.base import StepOutput, TaskShare, option_error, register_method, require_choice, require_positive_int
from fsltool.models.backbones import Backbone

MSL_FLOOR = 0.03  # the reference's floor on a non-final step's weight, times N (min_value_for_non_final_losses)

# method_options.step: tasks per inner-loop pass and per query pass of a meta-training step, from the device's
# work sizes. grouped: the fast step, tasks side by side as one grouped network; lean: one task at a time, its
# graphs freed before the next is built, the least memory (scripts/benchmark_maml_libraries.py measured both).
STEPS: dict[str, Callable[[WorkSizes], tuple[int, int]]] = {
    "grouped": lambda sizes: (sizes.inner_loop_tasks, sizes.query_tasks),
    "lean": lambda sizes: (1, 1),
}


# method_options.head_init: where each task's inner loop starts its linear head. zero: the meta-learned head, which
# starts at zero (MAML); prototypes: the support set's class means under the body (Proto-MAML).
HEAD_INITS = ("zero", "prototypes")


def multi_step_loss_weights(steps: int, done: int, anneal: int) -> list[float]:
    """The weights of the query losses after each of ``steps`` inner steps at meta-step ``done`` (0-based) of an
    annealing over ``anneal`` meta-steps (module docstring); the last step alone once ``done`` reaches ``anneal``."""
    if done >= anneal:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / anneal
    floor = MSL_FLOOR / steps
    earlier = [max(1.0 / steps - done * decay, floor)] * (steps - 1)
    return [*earlier, min(1.0 / steps + done * (steps - 1) * decay, 1.0 - (steps - 1) * floor)]


@register_method("maml")
class MAML(AdaptiveMethod):
    """MAML / first-order MAML, and MAML++'s options (module docstring).

    Options: ``way`` (the head's outputs: the episodes' way), ``inner_steps`` (SGD steps in meta-training),
    ``test_inner_steps`` (at evaluation), ``inner_lr``, ``first_order``, ``transductive_bn`` (False: queries are
    normalised with support-set BatchNorm statistics, non-transductive; True: with the query batch's statistics,
    as the paper's code, transductive); ``step`` (how meta-training runs a meta-batch: ``grouped``, the fast
    step, or ``lean``, the least memory; STEPS); ``head_init`` (HEAD_INITS); ``head_input`` (mean | flatten: what the
    head reads of the last feature maps, HEAD_INPUTS); ``initial_head`` (zero | glorot | normal: the meta-learned
    head's starting weights, INITIAL_HEADS); ``adapt_norms`` (False: BatchNorm scales and shifts are not
    adapted in the inner loop, as MAML's reference code); MAML++: ``multi_step_loss`` with ``multi_step_loss_epochs``,
    ``per_step_bn``, ``learn_inner_lr``, ``first_order_until``.
    """

    group_tasks = True  # run a meta-batch's tasks together (same results as episode by episode; grouped: faster)
    # Tasks per inner loop in meta-training (bounds the memory of the kept inner-loop graphs) and per query pass;
    # None: the step's (STEPS; grouped on the CPU: 8 and 4, the pair scripts/benchmark_maml_libraries.py measured).
    task_chunk: int | None = None
    query_chunk: int | None = None

    def __init__(
        self,
        backbone: Backbone,
        way: int = 5,
        inner_steps: int = 1,
        test_inner_steps: int = 3,
        inner_lr: float = 0.4,
        first_order: bool = False,
        transductive_bn: bool = False,
        multi_step_loss: bool = False,
        multi_step_loss_epochs: int = 5000,
        per_step_bn: bool = False,
        learn_inner_lr: bool = False,
        first_order_until: int = 0,
        step: str = "grouped",
        head_init: str = "zero",
        head_input: str = "mean",
        adapt_norms: bool | None = None,
        initial_head: str = "zero",
    ) -> None:
        super().__init__(backbone, way, transductive_bn, head_input, initial_head)
        require_choice(self.name, "step", step, STEPS)
        require_choice(self.name, "head_init", head_init, HEAD_INITS)
        require_positive_int(self.name, "inner_steps", inner_steps)
        require_positive_int(self.name, "test_inner_steps", test_inner_steps)
        for key, flag in (("first_order", first_order), ("multi_step_loss", multi_step_loss), ("per_step_bn", per_step_bn),
                          ("learn_inner_lr", learn_inner_lr)):
            require_bool(self.name, key, flag)
        require_positive_int(self.name, "multi_step_loss_epochs", multi_step_loss_epochs)
        if isinstance(first_order_until, bool) or not isinstance(first_order_until, int) or first_order_until < 0:
            raise option_error(self.name, "first_order_until", f"must be a whole number of meta-steps (0: off), got {first_order_until!r}")
        if first_order and first_order_until:
            raise option_error(self.name, "first_order_until", "anneals first order into second order: it needs first_order: false")
        if (per_step_bn or learn_inner_lr) and test_inner_steps > inner_steps:
            raise option_error(self.name, "test_inner_steps", f"({test_inner_steps}) must not exceed inner_steps ({inner_steps}): "
                               "per_step_bn and learn_inner_lr learn one set per training step")
        norm_layers = batch_norm_layers(backbone.features)
        if per_step_bn and not norm_layers:
            raise option_error(self.name, "per_step_bn", "needs BatchNorm layers, and the backbone has none")
        if adapt_norms is not None:
            require_bool(self.name, "adapt_norms", adapt_norms)
        if per_step_bn and adapt_norms:
            raise option_error(self.name, "adapt_norms", "must be left out or false with per_step_bn, which meta-learns one set of BatchNorm "
                               "parameters per step instead of adapting them")
        self.inner_steps = inner_steps
        self.test_inner_steps = test_inner_steps
        self.inner_lr = require_positive_float(self.name, "inner_lr", inner_lr)
        self.first_order = first_order
        self.multi_step_loss = multi_step_loss
        self.multi_step_loss_epochs = multi_step_loss_epochs
        self.per_step_bn = per_step_bn
        self.learn_inner_lr = learn_inner_lr
        self.first_order_until = first_order_until
        self.step_mode = step  # (self.step is the one-episode training step)
        self.head_init = head_init
        position = {id(p): i for i, p in enumerate(self.network.parameters)}
        adapt_norms = not per_step_bn if adapt_norms is None else adapt_norms
        # Where each BatchNorm scale and shift sits in the network's parameter list, in step_norms' order: the
        # tensors the inner loop leaves alone (per_step_bn swaps in each step's set instead).
        self.norm_positions = [] if adapt_norms else [position[id(p)] for layer in norm_layers for p in layer.parameters(recurse=False)]
        self.adapted_positions = [i for i in range(len(position)) if i not in set(self.norm_positions)]
        # Steps 1..N-1's BatchNorm layers (step 0's are the backbone's own).
        self.step_norms = nn.ModuleList(nn.ModuleList(copy.deepcopy(norm_layers)) for _ in range(inner_steps - 1)) if per_step_bn else None
        self.inner_lrs = nn.Parameter(torch.full((len(self.adapted_positions), inner_steps), self.inner_lr)) if learn_inner_lr else None
        if multi_step_loss or first_order_until:
            self.register_buffer("meta_steps_done", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def backbone_loaded(self) -> None:
        """per_step_bn: steps 1..N-1's BatchNorm layers start as copies of the backbone's, as when the method was
        built, now that the backbone holds its starting weights (scales, shifts and running statistics)."""
        for step in self.step_norms or []:
            for copied, loaded in zip(step, batch_norm_layers(self.backbone.features)):
                copied.load_state_dict(loaded.state_dict())

    def meta_tensors(self) -> list[torch.Tensor]:
        """Everything the outer loop learns, in the order task-major lists hold it: the network's parameters
        (TaskNetwork.parameters), then steps 1..N-1's BatchNorm scales and shifts, then the inner learning rates."""
        norms = [p for step in self.step_norms or [] for layer in step for p in layer.parameters(recurse=False)]
        return [*self.network.parameters, *norms, *([self.inner_lrs] if self.inner_lrs is not None else [])]

    def task_copies(self, tasks: int, *, detach: bool) -> Params:
        """meta_tensors repeated for ``tasks`` tasks: views that sum the tasks' gradients back into them, or
        (``detach``) fresh leaf tensors for an inner loop that must not reach the meta-parameters."""
        if detach:
            return [p.detach().unsqueeze(0).repeat(tasks, *([1] * p.dim())).requires_grad_() for p in self.meta_tensors()]
        return [p.unsqueeze(0).expand(tasks, *p.shape) for p in self.meta_tensors()]

    def norm_override(self, step: int) -> NormOverride | None:
        """Step ``step``'s BatchNorm layers in place of the backbone's (per_step_bn, steps after the first)."""
        if self.step_norms is None or step == 0:
            return None
        return dict(zip(batch_norm_layers(self.backbone.features), self.step_norms[step - 1]))

    def steps_done(self) -> int:
        return int(self.meta_steps_done) if hasattr(self, "meta_steps_done") else 0

    def second_order_now(self) -> bool:
        return not self.first_order and self.steps_done() >= self.first_order_until

    def step_loss_weights(self) -> list[float]:
        """This meta-step's weight of the query loss after each inner step (the last alone without MSL)."""
        if not self.multi_step_loss:
            return [0.0] * (self.inner_steps - 1) + [1.0]
        return multi_step_loss_weights(self.inner_steps, self.steps_done(), self.multi_step_loss_epochs)

    def adapt(
        self, meta: Params, support: torch.Tensor, labels: torch.Tensor, steps: int, create_graph: bool, track: bool, keep: Sequence[int] = (),
        differentiable: bool = True,
    ) -> dict[int, Params]:
        """``steps`` SGD steps on each task's support cross-entropy (batch statistics of the support set), from
        ``meta`` (task-major, in meta_tensors order). Returns, after step i for i in ``keep`` and the last step, the
        network's parameters with step i's BatchNorm scales and shifts in place: what the query pass after that
        step uses (only those are kept: the others may be freed as soon as the next step is taken).

        With ``create_graph`` the steps stay differentiable (second order); without it the gradients are
        constants, so the adapted parameters depend on ``meta`` as the identity (first order), and on the learned
        inner learning rates through their product with those constants. Not ``differentiable`` (evaluation): no
        graph back to ``meta`` is needed, so none is kept beyond what the steps themselves need."""
        count = len(self.network.parameters)
        network, lrs = meta[:count], (meta[-1] if self.inner_lrs is not None else None)
        # per_step_bn: each step's BatchNorm set in turn; otherwise none is swapped in (the same set at every step)
        per_step = len(self.norm_positions) if self.step_norms is not None else 0
        norms = [network[i] for i in self.norm_positions] + meta[count : count + per_step * (self.inner_steps - 1)] if per_step else []
        adapted = [network[i] for i in self.adapted_positions]

        def parameters_at(step: int) -> Params:
            params = list(network)
            for i, value in zip(self.adapted_positions, adapted):
                params[i] = value
            for i, value in zip(self.norm_positions, norms[step * per_step : (step + 1) * per_step]):
                params[i] = value
            return params

        after = {}
        for step in range(steps):
            tracked = track and (step == 0 or self.step_norms is not None)
            if step == 0 and self.head_init == "prototypes":  # the head is the last two adapted tensors
                features = self.network.features(parameters_at(0)[:-2], support, track=tracked, norms=self.norm_override(0),
                                                 twice_differentiated=create_graph)
                adapted[-2:] = prototype_head(features, labels, self.way)
                logits = head_logits(features, *adapted[-2:])
            else:
                logits = self.network.logits(parameters_at(step), support, track=tracked, norms=self.norm_override(step),
                                             twice_differentiated=create_graph)
            losses = task_losses(logits, labels)
            # The sum: each task's parameters only reach its own loss, so each gets its own mean-loss gradient.
            # First order keeps step 0's graph all the same where the head's start comes from it (the prototypes).
            keep_graph = create_graph or (differentiable and step == 0 and self.head_init == "prototypes")
            grads = torch.autograd.grad(losses.sum(), adapted, create_graph=create_graph, retain_graph=keep_graph)
            if lrs is None:
                adapted = [p - self.inner_lr * g for p, g in zip(adapted, grads)]
            else:
                adapted = [p - lrs[:, k, step].view(-1, *[1] * (p.dim() - 1)) * g for k, (p, g) in enumerate(zip(adapted, grads))]
            if step in keep or step == steps - 1:
                after[step] = parameters_at(step)
        return after

    def adapted_query_logits(
        self, params: Params | None, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, *, differentiable: bool
    ) -> torch.Tensor:
        """(T, S, ...), (T, S), (T, Q, ...) -> (T, Q, way) query logits after the inner loop from ``params`` (T, *shape,
        in meta_tensors order; None: a detached copy of the meta-parameters, made here where autograd is on even under
        inference_mode). ``differentiable``: a graph back to ``params`` (second or first order, as set); otherwise
        detached scores."""
        steps = self.inner_steps if self.training else self.test_inner_steps
        with self.grad_context(differentiable):
            support, support_labels, query = inputs_for_autograd((support, support_labels, query))
            if params is None:
                params = self.task_copies(support.shape[0], detach=True)
            create_graph = differentiable and self.second_order_now()
            adapted = self.adapt(params, support, support_labels, steps, create_graph, track=self.training, differentiable=differentiable)[steps - 1]
            logits = self.network.query_logits(adapted, support, query, self.transductive, self.norm_override(steps - 1))
        return logits if differentiable else logits.detach()

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Adapt to the support set (``inner_steps`` in train mode, ``test_inner_steps`` in eval mode), then score
        the queries: differentiable with respect to the meta-parameters where autograd is on; under no_grad or
        inference_mode (evaluation) the inner loop still runs, on a detached copy."""
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            self.episode_way(support_labels)
            params = self.task_copies(1, detach=False)
            return self.adapted_query_logits(params, support[None], support_labels[None], query[None], differentiable=True)[0]
        return super().forward(support, support_labels, query)

    def adapted_scores(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.adapted_query_logits(None, support, support_labels, query, differentiable=False)

    def meta_step(self, episodes: Sequence[Episode], share: TaskShare | None = None) -> list[StepOutput]:
        """The meta-batch's losses; a training meta-step (autograd on) then advances ``meta_steps_done``."""
        outputs = super().meta_step(episodes, share)
        if hasattr(self, "meta_steps_done") and torch.is_grad_enabled():
            self.meta_steps_done += 1
        return outputs

    def tasks_per_pass(self, device: torch.device) -> tuple[int, int]:
        """Tasks per inner-loop pass and per query pass in meta-training: the step's (STEPS), or ``task_chunk`` and
        ``query_chunk`` where set. One and one on a backbone that is no chain (ResNet-12): it runs task by task
        whatever the pass, so more tasks per pass would only hold their graphs together (first-order ResNet-12 at
        84 px peaked at 14.7 GB with 4 tasks' query passes held; docs/speed.md)."""
        if chain_layers(self.backbone.features) is None:
            return 1, 1
        inner, query = STEPS[self.step_mode](work_sizes(device))
        return self.task_chunk or inner, self.query_chunk or query

    def _steps(self, episodes: Sequence[Episode], share: TaskShare | None) -> list[StepOutput]:
        """Without autograd (a validation loss): the query losses. With it: each task's query loss L_t (MSL:
        sum_i w_i L_t,i), and the meta-gradient G = sum_t dL_t/dtheta with respect to the meta-parameters theta
        (meta_tensors), computed here a pass of tasks at a time (tasks_per_pass), each pass's tasks stacked and its
        graphs freed before the next is built (the meta-batch is never copied whole: 8 MB for 32 tasks of
        5w1s15q), and summed into one tensor per meta-tensor, allocated first (long-lived blocks made
        between the passes' large transient ones would fragment the heap: the lean step's resident peak was 2x its
        live tensors' with one gradient kept per task). Each returned loss is L_t + (<theta, G> - <theta, G>.detach())
        / T: the value of L_t, and 1/T of G, so that any equal weighting w of the T tasks (the training loop's mean,
        a data-parallel process's share of the global sum) backpropagates w G = sum_t w dL_t/dtheta."""
        if not torch.is_grad_enabled():
            support, support_labels, query, query_labels = stack_episodes(episodes)
            logits = self.adapted_query_logits(None, support, support_labels, query, differentiable=False)
            return [StepOutput(loss, scores) for loss, scores in zip(task_losses(logits, query_labels), logits)]
        theta = self.meta_tensors()
        gradient = [torch.zeros_like(p) for p in theta]
        inner_tasks, query_tasks = self.tasks_per_pass(episodes[0].support.device)
        losses, logits = [], []
        for start in range(0, len(episodes), inner_tasks):
            chunk_losses, chunk_logits = self.add_meta_gradient(gradient, *stack_episodes(episodes[start : start + inner_tasks]), query_tasks)
            losses.append(chunk_losses)
            logits.append(chunk_logits)
        surrogate = sum((p * g).sum() for p, g in zip(theta, gradient))
        assert isinstance(surrogate, torch.Tensor)
        carried = (surrogate - surrogate.detach()) / len(episodes)
        return [StepOutput(loss + carried, scores) for loss, scores in zip(torch.cat(losses), torch.cat(logits))]  # scores: after the last step

    def add_meta_gradient(
        self, gradient: Params, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
        query_tasks: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add these T tasks' meta-gradients sum_t dL_t/dtheta to ``gradient`` (meta_tensors order); return their
        query losses L_t (T,) and the query logits after the last step (T, Q, way), both detached.

        The inner loops start from per-task leaves (T, *shape) that alias theta (a task's loss reaches only its own
        slice). The chain rule is applied in two halves: g_t = dL_t/dphi_t at the adapted parameters phi_t (after
        each weighted step), from query passes whose graphs are freed as soon as they are differentiated
        (``query_tasks`` tasks at a time), then G_t = (dphi_t/dtheta)^T g_t through the inner loop's graph, which
        only holds the support passes (first order: dphi_t/dtheta is the identity, plus the learned learning rates'
        constant factors). Peak memory is the inner-loop graph plus one query pass, never both graphs of all tasks."""
        theta = self.meta_tensors()
        leaves = [p.detach().unsqueeze(0).expand(support.shape[0], *p.shape).requires_grad_() for p in theta]
        weights = {step: weight for step, weight in enumerate(self.step_loss_weights()) if weight}
        after = self.adapt(leaves, support, support_labels, self.inner_steps, self.second_order_now(), track=True, keep=list(weights))
        total_loss: torch.Tensor | float = 0.0
        outputs, output_grads = [], []
        for step, weight in weights.items():
            losses, logits, grads = self.weighted_query_gradients(after[step], self.norm_override(step), weight, support, query, query_labels,
                                                                  query_tasks)
            total_loss = total_loss + losses
            outputs += after[step]
            output_grads += grads
        # materialize_grads: zeros for a meta-tensor no weighted loss reaches (first order: earlier steps' BatchNorm).
        grads = torch.autograd.grad(outputs, leaves, grad_outputs=output_grads, allow_unused=True, materialize_grads=True)
        for total, task_grads in zip(gradient, grads):
            total += task_grads.sum(0)
        assert isinstance(total_loss, torch.Tensor)
        return total_loss, logits

    def weighted_query_gradients(
        self, adapted: Params, norms: NormOverride | None, weight: float, support: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
        per_pass: int,
    ) -> tuple[torch.Tensor, torch.Tensor, Params]:
        """weight * the query losses at ``adapted`` (T,), the query logits (T, Q, way), both detached, and the
        weighted losses' gradients with respect to ``adapted``, ``per_pass`` tasks per query pass."""
        losses, logits, query_grads = [], [], []
        for start in range(0, support.shape[0], per_pass):
            chunk = slice(start, start + per_pass)
            ends = [a[chunk].detach().requires_grad_() for a in adapted]
            chunk_logits = self.network.query_logits(ends, support[chunk], query[chunk], self.transductive, norms)
            chunk_losses = weight * task_losses(chunk_logits, query_labels[chunk])
            query_grads.append(torch.autograd.grad(chunk_losses.sum(), ends))
            losses.append(chunk_losses.detach())
            logits.append(chunk_logits.detach())
        return torch.cat(losses), torch.cat(logits), [torch.cat(parts) for parts in zip(*query_grads)]
