"""Prototypical Networks (Snell et al. 2017): a class is the mean embedding of its support images, and a
query is scored by its negative squared Euclidean distance to each prototype; or, as in Meta-Baseline (Chen et al.
2021), by its cosine similarity to each prototype times a learned temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fsltool.data.episodes import Episode
from fsltool.methods.base import (
    ExportGraph,
    Method,
    class_onehot,
    classifier_graph,
    embedding_graph,
    option_error,
    register_method,
    require_bool,
    require_choice,
    require_number,
)
from fsltool.models.backbones import Backbone

DISTANCES = ("euclidean", "cosine")
SCALE_PARAMETERS = ("log", "linear")
DEFAULT_SCALE = {"euclidean": 1.0, "cosine": 10.0}  # the papers': none for Snell et al., 10 for Meta-Baseline


def prototype_scores(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor
) -> torch.Tensor:
    """(..., S, D), (..., S), (..., Q, D) -> (..., Q, way): -||q - p_c||^2 with p_c the class means."""
    prototypes = class_prototypes(support, support_labels, way)
    return -(query.unsqueeze(-2) - prototypes.unsqueeze(-3)).pow(2).sum(-1)


def class_prototypes(support: torch.Tensor, support_labels: torch.Tensor, way: int | torch.Tensor) -> torch.Tensor:
    """(..., S, D), (..., S) -> (..., way, D): each class's mean support embedding."""
    onehot = class_onehot(support_labels, way, support.dtype)  # (..., S, way)
    return onehot.transpose(-1, -2) @ support / onehot.sum(-2).unsqueeze(-1)


def cosine_scores(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor) -> torch.Tensor:
    """(..., Q, way) cosine similarities of each query to each class prototype."""
    prototypes = F.normalize(class_prototypes(support, support_labels, way), dim=-1)
    return F.normalize(query, dim=-1) @ prototypes.transpose(-1, -2)


@register_method("protonet")
class ProtoNet(Method):
    """``distance``: euclidean (the paper: scores are -squared distances) or cosine (Meta-Baseline). ``scale``
    multiplies the scores (default 1 for euclidean, 10 for cosine); ``learn_scale`` makes it a parameter, learned
    in log space so it stays positive (``scale_parameter: log``) or as the number itself (``linear``: MetaOptNet's
    and Meta-Baseline's code; weight decay then pulls it towards 0 rather than 1). ``divide_by_dimension`` (euclidean)
    scores the squared distance divided by the embedding's dimension, as MetaOptNet's ProtoNet head: with flattened
    ResNet-12 maps (16,000 numbers) the plain sum saturates the softmax. ``label_smoothing`` softens the training
    loss's targets (torch's definition: 1 - e + e / way on the true class; MetaOptNet's ``--eps e`` equals torch's
    e * way / (way - 1))."""

    embeds_independently = True
    takes_support_copies = True

    def __init__(self, backbone: Backbone, distance: str = "euclidean", scale: float | None = None, learn_scale: bool = False,
                 scale_parameter: str = "log", divide_by_dimension: bool = False, label_smoothing: float = 0.0) -> None:
        super().__init__(backbone)
        require_choice(self.name, "distance", distance, DISTANCES)
        require_choice(self.name, "scale_parameter", scale_parameter, SCALE_PARAMETERS)
        require_bool(self.name, "learn_scale", learn_scale)
        require_bool(self.name, "divide_by_dimension", divide_by_dimension)
        if divide_by_dimension and distance != "euclidean":
            raise option_error(self.name, "divide_by_dimension", "divides the squared euclidean distance: it needs distance: euclidean")
        if scale_parameter != "log" and not learn_scale:
            raise option_error(self.name, "scale_parameter", "says how the learned scale is parametrised: it needs learn_scale: true")
        require_number(self.name, "label_smoothing", label_smoothing, lambda v: 0 <= v < 1, "a number in [0, 1)")
        self.label_smoothing = float(label_smoothing)
        scale = DEFAULT_SCALE[distance] if scale is None else scale
        require_number(self.name, "scale", scale, lambda v: v > 0, "a positive number")
        self.distance, self.divide_by_dimension, self.scale_parameter = distance, divide_by_dimension, scale_parameter
        if scale_parameter == "linear":
            self.linear_scale = nn.Parameter(torch.tensor(float(scale)))
        elif learn_scale:
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        else:
            self.register_buffer("log_scale", torch.tensor(math.log(scale)), persistent=False)  # checkpoints from before the option load

    def score_scale(self) -> torch.Tensor:
        """The factor the scores are multiplied by (0-dim, on the method's device)."""
        return self.linear_scale if self.scale_parameter == "linear" else self.log_scale.exp()

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        support_embeddings, query_embeddings = self.backbone_on_episode(support, query)
        return self.scores_from_embeddings(support_embeddings, support_labels, query_embeddings, support_labels.max() + 1)

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor
    ) -> torch.Tensor:
        scores = (prototype_scores if self.distance == "euclidean" else cosine_scores)(support, support_labels, query, way)
        if self.divide_by_dimension:
            scores = scores / query.shape[-1]
        return scores * self.score_scale()

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        return {"embedding": embedding_graph(self.backbone, example), "classifier": classifier_graph(self, example)}
