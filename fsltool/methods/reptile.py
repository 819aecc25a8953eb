"""Reptile (Nichol, Achiam and Schulman 2018): train a copy of the parameters on a task for a few steps of SGD or
Adam, then move the meta-parameters toward the result, theta <- theta + epsilon * mean_tasks(theta'_t - theta).

The training loop only knows losses and its optimizer, so a meta-step returns, per task, the surrogate loss
0.5 * ||theta - theta'_t||^2 (theta'_t held constant), whose gradient is theta - theta'_t. The loop averages the
meta-batch's losses and steps its optimizer: with ``train.optimizer: sgd``, ``train.momentum: 0``,
``train.weight_decay: 0`` and ``train.lr`` = epsilon, that step is exactly Reptile's meta-update (another outer
optimizer gives a Reptile variant; the paper's Adam-outer-loop experiment is one). The logged training loss is this
surrogate: half the squared distance the inner loop moved the parameters.

The inner loop follows the reference code (supervised-reptile): ``inner_steps`` minibatches of ``inner_batch``
images drawn without replacement from the task's images (support and query together, the paper's training
"shots"), reshuffled when used up; Adam with beta1 = 0 (the reference's ``AdamOptimizer(beta1=0)``) or plain SGD.
The reference keeps ONE Adam state for all tasks: its second-moment estimate and step count are never reset
between tasks, and evaluation fine-tunes from the state training left (restoring it after each episode). With
``inner_adam_state: fresh`` (the default) each task starts a new Adam instead, whose first steps are sign-like
(every coordinate moves by about the learning rate, however small its gradient). ``shared`` keeps the reference's
state as method buffers, saved with the checkpoints: each task of a meta-batch starts from it (the meta-batch's
tasks run side by side, so a task does not see the moments its predecessors in the batch added, the one
difference from the reference's task-by-task loop), and after the meta-step it absorbs every task's additions in
the reference's order, decayed as a sequential loop would have decayed them; evaluation starts each episode from
it and leaves it unchanged.

Evaluation fine-tunes on the support set alone (``test_inner_steps`` minibatches of ``test_inner_batch``, drawn
with a fixed seed so an episode's score is reproducible), then classifies the queries: BatchNorm statistics from
the support set (non-transductive, default), from the support set plus that one query (``per_query_bn``: the
reference code's non-transductive mode, behind the paper's non-transductive rows), or from the query batch
(``transductive_bn``, the paper's "transduction" rows); see fsltool.methods.adaptation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fsltool.data.episodes import Episode, stack_episodes
from fsltool.methods.adaptation import (
    AdaptiveMethod,
    Params,
    inputs_for_autograd,
    require_bool,
    require_positive_float,
    task_losses,
)
from fsltool.methods.base import StepOutput, TaskShare, option_error, register_method, require_choice, require_positive_int
from fsltool.models.backbones import Backbone

INNER_OPTIMIZERS = ("adam", "sgd")
ADAM_STATES = ("fresh", "shared")
ADAM_BETAS = (0.0, 0.999)  # the reference's AdamOptimizer(beta1=0)
EVAL_SEED = 0  # the evaluation fine-tuning's minibatch order: the same episode always gets the same score


def minibatch_order(tasks: int, images: int, steps: int, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """(tasks, steps, batch) image indices: each task's images shuffled, in batches, reshuffled when used up (a
    batch may span two shuffles, as the reference's ``_mini_batches`` without replacement)."""
    needed = steps * batch
    rounds = -(-needed // images)
    order = torch.cat([torch.rand(tasks, images, generator=generator).argsort(1) for _ in range(rounds)], 1)
    return order[:, :needed].view(tasks, steps, batch)


@register_method("reptile")
class Reptile(AdaptiveMethod):
    """Reptile.

    Options: ``way`` (the head's outputs: the episodes' way), ``inner_steps`` / ``inner_batch`` (meta-training:
    minibatches per task and images per minibatch, from the episode's support and query images),
    ``test_inner_steps`` / ``test_inner_batch`` (evaluation, from the support set), ``inner_lr``,
    ``inner_optimizer`` (adam | sgd), ``inner_adam_state`` (fresh: a new Adam per task; shared: the reference
    code's one Adam state across tasks and into evaluation), ``transductive_bn`` (False: queries are normalised with support-set
    BatchNorm statistics, non-transductive; True: with the query batch's, transductive), ``per_query_bn``
    (evaluation, non-transductive only: each query with the statistics of the support set plus itself, as the
    paper's non-transductive numbers; the training log's scores keep the support-set statistics), ``head_input``
    (mean | flatten: what the head reads of the last feature maps, HEAD_INPUTS; the reference code flattens),
    ``initial_head`` (zero | glorot | normal: the meta-learned head's starting weights; the reference's is glorot).
    """

    group_tasks = True  # run a meta-batch's inner loops together (same results as task by task; grouped: faster)

    def __init__(
        self,
        backbone: Backbone,
        way: int = 5,
        inner_steps: int = 5,
        inner_batch: int = 10,
        test_inner_steps: int = 50,
        test_inner_batch: int = 5,
        inner_lr: float = 0.001,
        inner_optimizer: str = "adam",
        inner_adam_state: str = "fresh",
        transductive_bn: bool = False,
        per_query_bn: bool = False,
        head_input: str = "mean",
        initial_head: str = "zero",
    ) -> None:
        super().__init__(backbone, way, transductive_bn, head_input, initial_head)
        require_bool(self.name, "per_query_bn", per_query_bn)
        if per_query_bn and transductive_bn:
            raise option_error(self.name, "per_query_bn", "is a non-transductive mode: it cannot be combined with transductive_bn: true")
        self.per_query_bn = per_query_bn
        for key, value in (("inner_steps", inner_steps), ("inner_batch", inner_batch), ("test_inner_steps", test_inner_steps),
                           ("test_inner_batch", test_inner_batch)):
            require_positive_int(self.name, key, value)
        require_choice(self.name, "inner_optimizer", inner_optimizer, INNER_OPTIMIZERS)
        self.inner_steps, self.inner_batch = inner_steps, inner_batch
        self.test_inner_steps, self.test_inner_batch = test_inner_steps, test_inner_batch
        self.inner_lr = require_positive_float(self.name, "inner_lr", inner_lr)
        self.inner_optimizer = inner_optimizer
        require_choice(self.name, "inner_adam_state", inner_adam_state, ADAM_STATES)
        if inner_adam_state == "shared" and inner_optimizer != "adam":
            raise option_error(self.name, "inner_adam_state", "shared is Adam's state: it needs inner_optimizer: adam")
        self.shared_adam = inner_adam_state == "shared"
        if self.shared_adam:
            for i, parameter in enumerate(self.network.parameters):
                self.register_buffer(f"inner_adam_sq_{i}", torch.zeros_like(parameter))
            self.register_buffer("inner_adam_steps", torch.zeros((), dtype=torch.float64))
            self.register_load_state_dict_post_hook(Reptile._read_adam_steps)
        self._adam_steps = 0  # inner_adam_steps on the host: read once when loaded, so a step never waits on a device

    @staticmethod
    def _read_adam_steps(module: nn.Module, incompatible_keys: object) -> None:
        assert isinstance(module, Reptile)
        module._adam_steps = int(module.inner_adam_steps)

    def _adam_squares(self) -> list[torch.Tensor]:
        return [getattr(self, f"inner_adam_sq_{i}") for i in range(len(self.network.parameters))]

    def _inner_optimizer(self, params: Params) -> torch.optim.Optimizer:
        """The task copies' optimizer: SGD, a fresh Adam, or Adam starting from the shared state (each task's
        copy of the second moments, the shared step count; beta1 = 0 leaves no first moment to carry)."""
        if self.inner_optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.inner_lr)
        optimizer = torch.optim.Adam(params, lr=self.inner_lr, betas=ADAM_BETAS, eps=1e-8)
        if self.shared_adam:
            for param, squares in zip(params, self._adam_squares()):
                optimizer.state[param] = {"step": torch.tensor(float(self._adam_steps)), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": squares.expand_as(param).clone()}
        return optimizer

    @torch.no_grad()
    def _absorb_adam_state(self, optimizer: torch.optim.Optimizer, params: Params, steps: int) -> None:
        """Fold the tasks' second-moment additions into the shared state as the reference's task-by-task loop
        would: task t's additions decay by the steps of the tasks after it. Non-finite values (a step the
        training loop will skip) leave the state as it was."""
        tasks = params[0].shape[0]
        decay = ADAM_BETAS[1] ** steps
        weights = decay ** torch.arange(tasks - 1, -1, -1, dtype=torch.float64, device=params[0].device)
        for param, squares in zip(params, self._adam_squares()):
            added = optimizer.state[param]["exp_avg_sq"] - decay * squares
            updated = decay**tasks * squares + (weights.to(squares.dtype).view(-1, *[1] * squares.dim()) * added).sum(0)
            squares.copy_(torch.where(torch.isfinite(updated), updated, squares))
        self._adam_steps += steps * tasks
        self.inner_adam_steps.fill_(self._adam_steps)

    def train_copies(
        self, images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, generator: torch.Generator | None, track: bool,
        share: TaskShare | None = None, same_order: bool = False, absorb: bool = False,
    ) -> Params:
        """Train one copy of the meta-parameters per task on (T, n, ...) images, (T, n) labels; returns the trained
        copies (T, *shape), detached. Each task's loss reaches only its own copy, so summing them trains each copy
        on its own mean loss, and Adam (element-wise) or SGD on the stacked copies is the per-task optimiser.
        With a ``share`` the minibatch order is drawn for the share's whole meta-batch and its rows kept; with
        ``same_order`` one order is drawn and every task uses it. ``absorb``: fold the tasks' Adam moments into
        the shared state (meta-training; the whole meta-batch must be here)."""
        tasks, count = labels.shape
        share = share or TaskShare(0, tasks)
        if absorb and self.shared_adam and share.total != tasks:
            raise option_error(self.name, "inner_adam_state", "shared needs the whole meta-batch in one process: it cannot "
                               "run data-parallel (use fresh)")
        with self.grad_context(False):
            images, labels = inputs_for_autograd((images, labels))
            params = self.network.meta_parameters(tasks, detach=True)
            optimizer = self._inner_optimizer(params)
            if same_order:
                order = minibatch_order(1, count, steps, batch, generator).expand(tasks, -1, -1)
            else:
                order = minibatch_order(share.total, count, steps, batch, generator)[share.start : share.start + tasks]
            rows = torch.arange(tasks).unsqueeze(1)
            for step in range(steps):
                chosen = order[:, step]
                loss = task_losses(self.network.logits(params, images[rows, chosen], track=track and step == 0), labels[rows, chosen]).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if absorb and self.shared_adam:
                self._absorb_adam_state(optimizer, params, steps)
        return [p.detach() for p in params]

    def transductive_copy(self) -> Reptile:
        twin = super().transductive_copy()
        assert isinstance(twin, Reptile)
        twin.per_query_bn = False  # a non-transductive mode, which takes precedence over transductive_bn
        return twin

    def adapted_scores(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Fine-tune a copy per task on its support set (eval mode: ``test_inner_steps`` x ``test_inner_batch``,
        every task with the minibatch order of the fixed seed, so an episode scores the same alone or beside
        others; train mode: ``inner_steps`` x ``inner_batch``, fresh orders), then score the queries."""
        if self.training:
            adapted = self.train_copies(support, support_labels, self.inner_steps, self.inner_batch, None, track=False)
        else:
            generator = torch.Generator().manual_seed(EVAL_SEED)
            adapted = self.train_copies(support, support_labels, self.test_inner_steps, self.test_inner_batch, generator,
                                        track=False, same_order=True)
        with torch.no_grad():
            if self.per_query_bn:
                return self.network.per_query_logits(adapted, support, query, self.pass_images(support.device))
            return self.network.query_logits(adapted, support, query, self.transductive)

    def _steps(self, episodes: Sequence[Episode], share: TaskShare | None) -> list[StepOutput]:
        """Per task: the inner loop on the episode's support and query images, then the surrogate loss
        0.5 * ||theta - theta'||^2 and, for the training log, the trained copy's query scores (images it trained
        on: a training accuracy, not a held-out one), of one query per class unless BatchNorm is transductive."""
        support, support_labels, query, query_labels = stack_episodes(episodes)
        images, labels = torch.cat([support, query], 1), torch.cat([support_labels, query_labels], 1)
        adapted = self.train_copies(images, labels, self.inner_steps, self.inner_batch, None, track=self.training, share=share,
                                    absorb=self.training)
        losses = sum(0.5 * (p.unsqueeze(0) - a).pow(2).flatten(1).sum(1) for p, a in zip(self.network.parameters, adapted))
        # Non-transductive scores of a query do not depend on the other queries: the log takes the first query of
        # each class (queries come class by class), a fifth of the meta-step's time saved at 20w1s9q.
        every = 1 if self.transductive else episodes[0].shape.query
        logged, logged_labels = query[:, ::every], query_labels[:, ::every]
        with torch.no_grad():
            scores = self.network.query_logits(adapted, support, logged, self.transductive)
        assert isinstance(losses, torch.Tensor)
        return [StepOutput(loss, task_scores, labels) for loss, task_scores, labels in zip(losses, scores, logged_labels)]
