"""Model-Agnostic Meta-Learning (Finn et al. 2017): meta-learn initial parameters from which a few SGD steps on
an episode's support set classify its queries well. The outer loss is the query cross-entropy of the adapted
parameters, differentiated through the inner SGD steps (second order), or with the adapted parameters' dependence
on the meta-parameters taken as the identity (``first_order``: FOMAML).

The network is the recipe's backbone (conv4-strided is MAML's Omniglot network) plus a linear head of ``way``
outputs on the spatially averaged feature maps; see fsltool.methods.adaptation for the head's zero
initialisation, the BatchNorm modes (``transductive_bn``) and how a meta-batch's tasks run together (one grouped
network for a chain backbone such as conv4-strided, per-task passes of the module's own forward otherwise).
"""

from __future__ import annotations


import torch

from fsltool.methods.adaptation import (
    AdaptiveMethod,
    Params,
    inputs_for_autograd,
    require_bool,
    require_positive_float,
    task_losses,
)
from fsltool.methods.base import StepOutput, register_method, require_positive_int
from fsltool.models.backbones import Backbone


@register_method("maml")
class MAML(AdaptiveMethod):
    """MAML / first-order MAML.

    Options: ``way`` (the head's outputs: the episodes' way), ``inner_steps`` (SGD steps in meta-training),
    ``test_inner_steps`` (at evaluation), ``inner_lr``, ``first_order``, ``transductive_bn`` (False: queries are
    normalised with support-set BatchNorm statistics, non-transductive; True: with the query batch's statistics,
    as the paper's code, transductive).
    """

    group_tasks = True  # run a meta-batch's tasks together (same results as episode by episode; grouped: faster)
    task_chunk = 8  # tasks per inner loop in meta-training; bounds the memory of the kept inner-loop graphs
    query_chunk = 4  # tasks per query pass (scripts/benchmark_maml_libraries.py measured the pair)

    def __init__(
        self,
        backbone: Backbone,
        way: int = 5,
        inner_steps: int = 1,
        test_inner_steps: int = 3,
        inner_lr: float = 0.4,
        first_order: bool = False,
        transductive_bn: bool = False,
    ) -> None:
        super().__init__(backbone, way, transductive_bn)
        require_positive_int(self.name, "inner_steps", inner_steps)
        require_positive_int(self.name, "test_inner_steps", test_inner_steps)
        require_bool(self.name, "first_order", first_order)
        self.inner_steps = inner_steps
        self.test_inner_steps = test_inner_steps
        self.inner_lr = require_positive_float(self.name, "inner_lr", inner_lr)
        self.first_order = first_order

    def adapt(self, params: Params, support: torch.Tensor, labels: torch.Tensor, steps: int, create_graph: bool, track: bool) -> Params:
        """``steps`` SGD steps on each task's support cross-entropy (batch statistics of the support set).

        With ``create_graph`` the steps stay differentiable (second order); without it the gradients are
        constants, so the adapted parameters depend on ``params`` as the identity (first order)."""
        for step in range(steps):
            losses = task_losses(self.network.logits(params, support, track=track and step == 0), labels)
            # The sum: each task's parameters only reach its own loss, so each gets its own mean-loss gradient.
            grads = torch.autograd.grad(losses.sum(), params, create_graph=create_graph)
            params = [p - self.inner_lr * g for p, g in zip(params, grads)]
        return params

    def adapted_query_logits(
        self, params: Params | None, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, *, differentiable: bool
    ) -> torch.Tensor:
        """(T, S, ...), (T, S), (T, Q, ...) -> (T, Q, way) query logits after the inner loop from ``params`` (T, *shape;
        None: a detached copy of the meta-parameters, made here where autograd is on even under inference_mode).
        ``differentiable``: a graph back to ``params`` (second or first order, as set); otherwise detached scores."""
        steps = self.inner_steps if self.training else self.test_inner_steps
        with self.grad_context(differentiable):
            support, support_labels, query = inputs_for_autograd((support, support_labels, query))
            if params is None:
                params = self.network.meta_parameters(support.shape[0], detach=True)
            create_graph = differentiable and not self.first_order
            adapted = self.adapt(params, support, support_labels, steps, create_graph, track=self.training)
            logits = self.network.query_logits(adapted, support, query, self.transductive)
        return logits if differentiable else logits.detach()

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Adapt to the support set (``inner_steps`` in train mode, ``test_inner_steps`` in eval mode), then score
        the queries: differentiable with respect to the meta-parameters where autograd is on; under no_grad or
        inference_mode (evaluation) the inner loop still runs, on a detached copy."""
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            self.episode_way(support_labels)
            params = self.network.meta_parameters(1)
            return self.adapted_query_logits(params, support[None], support_labels[None], query[None], differentiable=True)[0]
        return super().forward(support, support_labels, query)

    def adapted_scores(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.adapted_query_logits(None, support, support_labels, query, differentiable=False)

    def _steps(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor
    ) -> list[StepOutput]:
        """Without autograd (a validation loss): the query losses. With it: the meta-gradient is computed here,
        ``task_chunk`` tasks at a time, each chunk's graph freed before the next is built (peak memory: one chunk's
        graph, not the meta-batch's), and each task's loss carries its own meta-gradient (see meta_gradient_losses)."""
        if not torch.is_grad_enabled():
            logits = self.adapted_query_logits(None, support, support_labels, query, differentiable=False)
            return [StepOutput(loss, scores) for loss, scores in zip(task_losses(logits, query_labels), logits)]
        outputs: list[StepOutput] = []
        for start in range(0, support.shape[0], self.task_chunk):
            chunk = slice(start, start + self.task_chunk)
            outputs += self.meta_gradient_losses(support[chunk], support_labels[chunk], query[chunk], query_labels[chunk])
        return outputs

    def meta_gradient_losses(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor
    ) -> list[StepOutput]:
        """Per task t: a loss whose value is the query loss L_t and whose gradient with respect to the
        meta-parameters theta is dL_t/dtheta, computed now by autograd through the inner loop.

        The inner loops start from per-task leaves (T, *shape) that alias theta, so every task gets its own
        meta-gradient G_t (a task's loss reaches only its own slice). The chain rule is applied in two halves:
        g_t = dL_t/dphi_t at the adapted parameters phi_t, from a query pass whose graph is freed as soon as it is
        differentiated (``query_chunk`` tasks at a time), then G_t = (dphi_t/dtheta)^T g_t through the inner loop's
        graph, which only holds the support passes (first order: dphi_t/dtheta is the identity, G_t = g_t). Peak
        memory is the inner-loop graph plus one query chunk, never both graphs of all tasks. The returned loss is
        L_t + <theta, G_t> - <theta, G_t>.detach(): the value of L_t, the gradient G_t, for whatever weighting of
        the tasks the training loop backpropagates."""
        theta = self.network.parameters
        leaves = [p.detach().unsqueeze(0).expand(support.shape[0], *p.shape).requires_grad_() for p in theta]
        adapted = self.adapt(leaves, support, support_labels, self.inner_steps, not self.first_order, track=True)
        losses, logits, query_grads = [], [], []
        for start in range(0, support.shape[0], self.query_chunk):
            chunk = slice(start, start + self.query_chunk)
            ends = [a[chunk].detach().requires_grad_() for a in adapted]
            chunk_logits = self.network.query_logits(ends, support[chunk], query[chunk], self.transductive)
            chunk_losses = task_losses(chunk_logits, query_labels[chunk])
            query_grads.append(torch.autograd.grad(chunk_losses.sum(), ends))
            losses.append(chunk_losses.detach())
            logits.append(chunk_logits.detach())
        grads = [torch.cat(parts) for parts in zip(*query_grads)]
        if not self.first_order:
            grads = list(torch.autograd.grad(adapted, leaves, grad_outputs=grads))
        surrogate = sum((p.unsqueeze(0) * g).flatten(1).sum(1) for p, g in zip(theta, grads))
        assert isinstance(surrogate, torch.Tensor)
        total = torch.cat(losses) + (surrogate - surrogate.detach())
        return [StepOutput(loss, scores) for loss, scores in zip(total, torch.cat(logits))]
