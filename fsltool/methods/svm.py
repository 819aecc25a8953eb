"""A multi-class support vector machine fitted on each episode's support set, MetaOptNet-SVM's head (Lee et al. 2019,
"Meta-Learning with Differentiable Convex Optimization"): Crammer and Singer's SVM in its dual, a quadratic program
solved by a differentiable interior-point method (fsltool.methods.qp, qpth's iteration), so the backbone is
meta-trained through the fit.

The dual, as MetaOptNet's ``MetaOptNetHead_SVM_CS`` poses it (S support images, N classes, K the support Gram
matrix, Y the one-hot labels): minimise 1/2 sum_m |sum_i alpha_im x_i|^2 + ridge/2 |alpha|^2 - sum_im Y_im alpha_im
subject to alpha_im <= C Y_im and sum_m alpha_im = 0 for each i; a query q scores sum_i alpha_im (x_i . q) for
class m, times a scale learned from 1. ``ridge`` is the 1.0 their code adds to the Hessian's diagonal ("seems to help
avoid PSD error from the QP solver"): it makes the problem strictly convex and is part of what they trained."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError
from fsltool.methods.base import (
    ExportGraph,
    Method,
    StepOutput,
    TaskShare,
    add_learned_scale,
    class_onehot,
    full_precision,
    register_method,
    require_bool,
    require_number,
    require_positive_int,
)
from fsltool.methods.qp import qp_solution
from fsltool.models.backbones import Backbone


def svm_dual(support: torch.Tensor, support_labels: torch.Tensor, way: int, cost: float, ridge: float,
             iterations: int) -> torch.Tensor:
    """(E, S, D), (E, S) -> (E, S, way): each episode's dual coefficients alpha after ``iterations`` interior-point
    iterations, in the support's dtype; variables ordered image by image, as MetaOptNet's Kronecker products."""
    episodes, shots, dtype, device = support.shape[0], support.shape[1], support.dtype, support.device
    size = shots * way
    with full_precision(device):
        gram = support @ support.transpose(1, 2)
        classes = torch.eye(way, dtype=dtype, device=device)
        hessian = (gram[:, :, None, :, None] * classes[None, None, :, None, :]).reshape(episodes, size, size)
        hessian = hessian + ridge * torch.eye(size, dtype=dtype, device=device)
        onehot = class_onehot(support_labels, way, dtype).reshape(episodes, size)
        each_image = torch.eye(shots, dtype=dtype, device=device).repeat_interleave(way, dim=1)[None]  # (1, S, S*way)
        rhs = support.new_zeros(episodes, shots)
        return qp_solution(hessian, -onehot, cost * onehot, each_image, rhs, iterations).reshape(episodes, shots, way)


@register_method("svm")
class MultiClassSVM(Method):
    """MetaOptNet-SVM: a Crammer-Singer SVM fitted on each episode's support embeddings (flattened). Options, with
    MetaOptNet's values as defaults: ``cost`` (C, their ``C_reg`` 0.1), ``ridge`` (the 1.0 on the Hessian's
    diagonal), ``iterations`` (interior-point iterations in training: their default ``maxIter`` 15),
    ``evaluation_iterations`` (whenever the method is not training, validation included: their test.py's 3; their
    validation used 15), ``double_precision`` (false: the solve in float32 as theirs; true: float64),
    ``scale`` / ``learn_scale`` (the scores times a parameter starting at 1, their ClassificationHead's) and
    ``label_smoothing`` (torch's definition; their --eps e is torch's e * way / (way - 1))."""

    embeds_independently = True
    takes_support_copies = True
    classifier_only_options = {"learn_scale": False}

    def __init__(self, backbone: Backbone, cost: float = 0.1, ridge: float = 1.0, iterations: int = 15,
                 evaluation_iterations: int = 3, double_precision: bool = False, scale: float = 1.0,
                 learn_scale: bool = True, label_smoothing: float = 0.0) -> None:
        super().__init__(backbone)
        require_number(self.name, "cost", cost, lambda v: v > 0, "a positive number")
        require_number(self.name, "ridge", ridge, lambda v: v > 0, "a positive number (the dual must be strictly convex)")
        require_positive_int(self.name, "iterations", iterations)
        require_positive_int(self.name, "evaluation_iterations", evaluation_iterations)
        require_bool(self.name, "double_precision", double_precision)
        require_number(self.name, "label_smoothing", label_smoothing, lambda v: 0 <= v < 1, "a number in [0, 1)")
        self.cost, self.ridge = float(cost), float(ridge)
        self.iterations, self.evaluation_iterations = iterations, evaluation_iterations
        self.solve_dtype = torch.float64 if double_precision else torch.float32
        self.label_smoothing = float(label_smoothing)
        add_learned_scale(self, scale, learn_scale)

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor
    ) -> torch.Tensor:
        x, q = support.flatten(2).to(self.solve_dtype), query.flatten(2).to(self.solve_dtype)
        iterations = self.iterations if self.training else self.evaluation_iterations
        alpha = svm_dual(x, support_labels, int(way), self.cost, self.ridge, iterations)  # outside autocast itself
        with full_precision(x.device):
            scores = (q @ x.transpose(1, 2)) @ alpha
        return (scores.float() * self.scale).to(query.dtype)

    def meta_step(self, episodes: list[Episode], share: TaskShare | None = None) -> list[StepOutput]:
        """Each episode through the backbone on its own (its own BatchNorm statistics), then one batched solve for the
        meta-batch; the way comes from the episodes' shape, not from their labels (no host synchronisation). A
        meta-batch whose episodes differ in shape (a range of shots) is solved episode by episode."""
        if len({(e.support.shape, e.query.shape) for e in episodes}) > 1:
            return [self.meta_step([episode])[0] for episode in episodes]
        embedded = [self.backbone_on_episode(episode.support, episode.query) for episode in episodes]
        support = torch.stack([s for s, _ in embedded])
        query = torch.stack([q for _, q in embedded])
        labels = torch.stack([episode.support_labels for episode in episodes])
        scores = self.scores_from_embeddings(support, labels, query, episodes[0].shape.way)
        return [StepOutput(F.cross_entropy(s, episode.query_labels, label_smoothing=self.label_smoothing), s)
                for s, episode in zip(scores, episodes)]

    def step(self, episode: Episode) -> StepOutput:
        return self.meta_step([episode])[0]

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        raise FsltoolError(f"method {self.name!r} cannot be exported: its scores solve a quadratic program per episode, "
                           "which ONNX has no operator for; export the backbone under protonet instead (a protonet run "
                           "with this run as init:)")
