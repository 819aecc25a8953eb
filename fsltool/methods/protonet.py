"""Prototypical Networks (Snell et al. 2017): a class is the mean embedding of its support images, and a
query is scored by its negative squared Euclidean distance to each prototype."""

from __future__ import annotations

import torch

from fsltool.data.episodes import Episode
from fsltool.methods.base import ExportGraph, Method, register_method


def prototype_scores(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor
) -> torch.Tensor:
    """(..., S, D), (..., S), (..., Q, D) -> (..., Q, way): -||q - p_c||^2 with p_c the class means.

    One-hot by comparison with arange(way) rather than F.one_hot, so ``way`` may be a tensor computed
    from the labels: the exported graph then has dynamic way, shot and query.
    """
    classes = torch.arange(way, device=support_labels.device)
    onehot = (support_labels.unsqueeze(-1) == classes).to(support.dtype)  # (..., S, way)
    prototypes = onehot.transpose(-1, -2) @ support / onehot.sum(-2).unsqueeze(-1)  # (..., way, D)
    return -(query.unsqueeze(-2) - prototypes.unsqueeze(-3)).pow(2).sum(-1)


@register_method("protonet")
class ProtoNet(Method):
    embeds_independently = True

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        # One backbone pass over support and query together: one set of BatchNorm batch statistics.
        embeddings = self.backbone(torch.cat([support, query]))
        n_support = support.shape[0]
        return prototype_scores(embeddings[:n_support], support_labels, embeddings[n_support:], support_labels.max() + 1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int
    ) -> torch.Tensor:
        return prototype_scores(support, support_labels, query, way)

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        return {
            "embedding": ExportGraph(
                self.backbone, (example.query,), ["images"], ["embeddings"], {"images": {0: "batch"}}
            ),
            "classifier": ExportGraph(
                self,
                (example.support, example.support_labels, example.query),
                ["support", "support_labels", "query"],
                ["scores"],
                {"support": {0: "support"}, "support_labels": {0: "support"}, "query": {0: "query"}},
            ),
        }
