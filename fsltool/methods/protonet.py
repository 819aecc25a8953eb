"""Prototypical Networks (Snell et al. 2017): a class is the mean embedding of its support images, and a
query is scored by its negative squared Euclidean distance to each prototype."""

from __future__ import annotations

import torch

from fsltool.data.episodes import Episode
from fsltool.methods.base import ExportGraph, Method, class_onehot, classifier_graph, embedding_graph, register_method


def prototype_scores(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor
) -> torch.Tensor:
    """(..., S, D), (..., S), (..., Q, D) -> (..., Q, way): -||q - p_c||^2 with p_c the class means."""
    onehot = class_onehot(support_labels, way, support.dtype)  # (..., S, way)
    prototypes = onehot.transpose(-1, -2) @ support / onehot.sum(-2).unsqueeze(-1)  # (..., way, D)
    return -(query.unsqueeze(-2) - prototypes.unsqueeze(-3)).pow(2).sum(-1)


@register_method("protonet")
class ProtoNet(Method):
    embeds_independently = True

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        support_embeddings, query_embeddings = self.backbone_on_episode(support, query)
        return prototype_scores(support_embeddings, support_labels, query_embeddings, support_labels.max() + 1)

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int
    ) -> torch.Tensor:
        return prototype_scores(support, support_labels, query, way)

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        return {"embedding": embedding_graph(self.backbone, example), "classifier": classifier_graph(self, example)}
