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
One deviation: the reference keeps one Adam state across all tasks (its moment estimates are never reset); here
each task starts a fresh optimizer, so tasks stay independent and a meta-batch's tasks can run together (one
grouped network for a chain backbone; see fsltool.methods.adaptation).

Evaluation fine-tunes on the support set alone (``test_inner_steps`` minibatches of ``test_inner_batch``, drawn
with a fixed seed so an episode's score is reproducible), then classifies the queries: BatchNorm statistics from
the support set (non-transductive, default), from the support set plus that one query (``per_query_bn``: the
reference code's non-transductive mode, behind the paper's non-transductive rows), or from the query batch
(``transductive_bn``, the paper's "transduction" rows); see fsltool.methods.adaptation.
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
from fsltool.methods.base import StepOutput, TaskShare, option_error, register_method, require_positive_int
from fsltool.models.backbones import Backbone

INNER_OPTIMIZERS = ("adam", "sgd")
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
    ``inner_optimizer`` (adam | sgd), ``transductive_bn`` (False: queries are normalised with support-set
    BatchNorm statistics, non-transductive; True: with the query batch's, transductive), ``per_query_bn``
    (evaluation, non-transductive only: each query with the statistics of the support set plus itself, as the
    paper's non-transductive numbers; the training log's scores keep the support-set statistics).
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
        transductive_bn: bool = False,
        per_query_bn: bool = False,
    ) -> None:
        super().__init__(backbone, way, transductive_bn)
        require_bool(self.name, "per_query_bn", per_query_bn)
        if per_query_bn and transductive_bn:
            raise option_error(self.name, "per_query_bn", "is a non-transductive mode: it cannot be combined with transductive_bn: true")
        self.per_query_bn = per_query_bn
        for key, value in (("inner_steps", inner_steps), ("inner_batch", inner_batch), ("test_inner_steps", test_inner_steps),
                           ("test_inner_batch", test_inner_batch)):
            require_positive_int(self.name, key, value)
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise option_error(self.name, "inner_optimizer", f"must be one of {', '.join(INNER_OPTIMIZERS)}, got {inner_optimizer!r}")
        self.inner_steps, self.inner_batch = inner_steps, inner_batch
        self.test_inner_steps, self.test_inner_batch = test_inner_steps, test_inner_batch
        self.inner_lr = require_positive_float(self.name, "inner_lr", inner_lr)
        self.inner_optimizer = inner_optimizer

    def train_copies(
        self, images: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, generator: torch.Generator | None, track: bool,
        share: TaskShare | None = None, same_order: bool = False,
    ) -> Params:
        """Train one copy of the meta-parameters per task on (T, n, ...) images, (T, n) labels; returns the trained
        copies (T, *shape), detached. Each task's loss reaches only its own copy, so summing them trains each copy
        on its own mean loss, and Adam (element-wise) or SGD on the stacked copies is the per-task optimiser.
        With a ``share`` the minibatch order is drawn for the share's whole meta-batch and its rows kept; with
        ``same_order`` one order is drawn and every task uses it."""
        tasks, count = labels.shape
        share = share or TaskShare(0, tasks)
        with self.grad_context(False):
            images, labels = inputs_for_autograd((images, labels))
            params = self.network.meta_parameters(tasks, detach=True)
            if self.inner_optimizer == "adam":
                optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.inner_lr, betas=(0.0, 0.999), eps=1e-8)
            else:
                optimizer = torch.optim.SGD(params, lr=self.inner_lr)
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
        return [p.detach() for p in params]

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

    def _steps(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
        share: TaskShare | None,
    ) -> list[StepOutput]:
        """Per task: the inner loop on the episode's support and query images, then the surrogate loss
        0.5 * ||theta - theta'||^2 and, for the training log, the trained copy's query scores (images it trained
        on: a training accuracy, not a held-out one)."""
        images, labels = torch.cat([support, query], 1), torch.cat([support_labels, query_labels], 1)
        adapted = self.train_copies(images, labels, self.inner_steps, self.inner_batch, None, track=self.training, share=share)
        losses = sum(0.5 * (p.unsqueeze(0) - a).pow(2).flatten(1).sum(1) for p, a in zip(self.network.parameters, adapted))
        with torch.no_grad():
            scores = self.network.query_logits(adapted, support, query, self.transductive)
        assert isinstance(losses, torch.Tensor)
        return [StepOutput(loss, task_scores) for loss, task_scores in zip(losses, scores)]
