"""Ridge regression on each episode's support set, MetaOptNet-RR's head (Lee et al. 2019, "Meta-Learning with
Differentiable Convex Optimization"; ridge regression as a differentiable base learner after Bertinetto et al.
2019, R2D2): the support embeddings regressed onto their one-hot labels with an L2 penalty, solved in closed form in
the dual, an S x S system (S support images, whatever the embedding's size), differentiable, so the backbone is
meta-trained through the solve.

MetaOptNet's ``MetaOptNetHead_Ridge`` poses the dual as a QP (min 1/2 a^T (K + lambda I) a - 2 y^T a, K the support
Gram matrix) whose solution is twice the ridge regression's; its ``ClassificationHead`` multiplies the scores by a
scale learned from 1. Scores here: scale x query . support^T (K + lambda I)^{-1} 2Y, the same function."""

from __future__ import annotations

import torch

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError
from fsltool.methods.base import (
    ExportGraph,
    Method,
    add_learned_scale,
    class_onehot,
    full_precision,
    register_method,
    require_number,
)
from fsltool.models.backbones import Backbone


def ridge_scores(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor,
                 penalty: float) -> torch.Tensor:
    """(E, S, D), (E, S), (E, Q, D) -> (E, Q, way): each query's score for each class under the ridge regression of
    the support set onto 2 x its one-hot labels, in float32 (the solve is well conditioned for penalty > 0)."""
    x, q = support.float(), query.float()
    with full_precision(x.device):
        gram = x @ x.transpose(1, 2)
        gram.diagonal(dim1=1, dim2=2).add_(penalty)
        dual = torch.linalg.solve(gram, 2 * class_onehot(support_labels, way, torch.float32))  # (E, S, way)
        return (q @ x.transpose(1, 2)) @ dual


@register_method("ridge")
class RidgeRegression(Method):
    """MetaOptNet-RR: a ridge regression fitted on each episode's support embeddings (flattened), differentiable.
    Options: ``penalty`` (lambda; MetaOptNet's ``lambda_reg`` 50), ``scale`` (1) and ``learn_scale`` (true: the
    number itself a parameter, as MetaOptNet's ClassificationHead)."""

    embeds_independently = True
    takes_support_copies = True
    classifier_only_options = {"learn_scale": False}

    def __init__(self, backbone: Backbone, penalty: float = 50.0, scale: float = 1.0, learn_scale: bool = True) -> None:
        super().__init__(backbone)
        require_number(self.name, "penalty", penalty, lambda v: v > 0, "a positive number")
        self.penalty = float(penalty)
        add_learned_scale(self, scale, learn_scale)

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor
    ) -> torch.Tensor:
        scores = ridge_scores(support.flatten(2), support_labels, query.flatten(2), way, self.penalty)
        return (scores * self.scale).to(query.dtype)

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        raise FsltoolError(f"method {self.name!r} cannot be exported: its scores solve a linear system per episode, which "
                           "ONNX has no operator for; export the backbone under protonet instead (a protonet run with this "
                           "run as init:)")

