"""What the model-based methods (MANN, SNAIL) share: an episode read as a sequence of (embedding, one-hot label)
steps by a network with a fixed number of label slots, the method option ``way``.

Each image is embedded alone by the recipe's backbone, so evaluation embeds every image once and scores whole
batches of episodes at a time. The support set is the labelled part of the sequence and every query is the next
step after it, scored from the support alone: queries never see each other (no transduction at test time).
Training shuffles the support order of every episode, and evaluation shows each stored episode's support in a
seeded shuffled order (``order_sensitive``), never the class-by-class layout episodes are stored in.

BatchNorm in the backbone: evaluation normalises with the running statistics (non-transductive). Training with each
episode's own batch statistics (``batch_norm_over: episode``, 30 images of 5 classes at 5w1s5q) lets the sequence
model lean on statistics that evaluation never gives it; ``meta_batch`` embeds the whole meta-batch in one pass,
whose statistics are close to the running ones (docs/results.md, SNAIL).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace

import torch
import torch.nn.functional as F

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError
from fsltool.methods.base import (
    ExportGraph,
    Method,
    StepOutput,
    TaskShare,
    class_onehot,
    classifier_graph,
    embedding_graph,
    option_error,
    require_choice,
    require_positive_int,
)
from fsltool.models.backbones import Backbone

BATCH_NORM_OVER = ("episode", "meta_batch")  # training's BatchNorm batch: each episode's images, or the meta-batch's


def first_columns(scores: torch.Tensor, way: int | torch.Tensor) -> torch.Tensor:
    """(..., W) -> (..., way): the first ``way`` label slots, as a product with a 0/1 matrix rather than a slice,
    so ``way`` may be a tensor computed from the labels (dynamic way in the exported graph, as class_onehot)."""
    slots = torch.arange(scores.shape[-1], device=scores.device)
    return scores @ class_onehot(slots, way, scores.dtype)


class SequenceMethod(Method):
    """A sequence model over (embedding, label) steps with ``way`` label slots: episodes of up to ``way`` classes."""

    embeds_independently = True
    order_sensitive = True

    def __init__(self, backbone: Backbone, way: int, batch_norm_over: str = "episode") -> None:
        super().__init__(backbone)
        require_choice(self.name, "batch_norm_over", batch_norm_over, BATCH_NORM_OVER)
        self.batch_norm_over = batch_norm_over
        if not backbone.flatten:
            raise FsltoolError(
                f"method {self.name!r} reads embedding vectors, but the recipe's backbone keeps feature maps: "
                "use a flattening backbone (e.g. 'backbone: conv4') or drop 'flatten: false' from backbone_options"
            )
        require_positive_int(self.name, "way", way)
        if way < 2:
            raise option_error(self.name, "way", f"must be at least 2 (the episodes' way), got {way}")
        self.way = way
        self.embedding_size = backbone.embedding_size

    @abstractmethod
    def query_logits(self, support: torch.Tensor, support_onehot: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """(E, S, D) support embeddings, (E, S, way slots) their one-hot labels, (E, Q, D) queries -> (E, Q, slots),
        each query scored as the step after the support sequence, independently of the other queries."""

    def check_episode(self, embedding_size: int, way: int | torch.Tensor) -> None:
        """Eager runs only: an exported graph takes way from the label values and cannot raise."""
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return
        if embedding_size != self.embedding_size:
            raise FsltoolError(
                f"method {self.name!r}: the backbone gives {embedding_size}-d embeddings but the sequence model reads "
                f"{self.embedding_size}-d ones (its channel count): use images the backbone reduces to 1x1 maps (28x28 for conv4)"
            )
        if int(way) > self.way:
            raise FsltoolError(
                f"method {self.name!r}: the episode is {int(way)}-way but the model has method_options.way = {self.way} "
                "label slots; train a model with way at least the episodes' way"
            )

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor
    ) -> torch.Tensor:
        self.check_episode(support.shape[-1], way)
        logits = self.query_logits(support, class_onehot(support_labels, self.way, support.dtype), query)
        return first_columns(logits, way)

    @staticmethod
    def random_orders(count: int, length: int, share: TaskShare | None) -> torch.Tensor:
        """(count, length) random orders for a meta-step's episodes, drawn for the whole meta-batch and this
        process's rows kept (``share``, see Method.meta_step), so data-parallel training draws what one process would."""
        share = share or TaskShare(0, count)
        return torch.stack([torch.randperm(length) for _ in range(share.total)])[share.start : share.start + count]

    def step(self, episode: Episode) -> StepOutput:
        return self.meta_step([episode])[0]

    def meta_step(self, episodes: list[Episode], share: TaskShare | None = None) -> list[StepOutput]:
        """Cross-entropy on the queries, with the support set in a new random order every time: a sequence model
        would otherwise learn the class-by-class layout of stored episodes rather than to read any order."""
        orders = self.random_orders(len(episodes), len(episodes[0].support_labels), share)
        if self.batch_norm_over == "meta_batch":
            return self._meta_batch_step(episodes, orders)
        outputs = []
        for episode, order in zip(episodes, orders):
            scores = self(episode.support[order], episode.support_labels[order], episode.query)
            outputs.append(StepOutput(F.cross_entropy(scores, episode.query_labels), scores))
        return outputs

    def _meta_batch_step(self, episodes: list[Episode], orders: torch.Tensor) -> list[StepOutput]:
        """The meta-batch's images through the backbone in one pass (one set of batch statistics), then every
        episode's sequence at once; episodes of one shape (as the training loop draws them)."""
        if len({e.shape for e in episodes}) != 1:
            raise FsltoolError(f"method {self.name!r}: batch_norm_over: meta_batch needs a meta-batch of one episode shape")
        device = episodes[0].support.device
        orders, tasks = orders.to(device), torch.arange(len(episodes), device=device).unsqueeze(1)
        support = torch.stack([e.support for e in episodes])[tasks, orders]
        support_labels = torch.stack([e.support_labels for e in episodes])[tasks, orders]
        query = torch.stack([e.query for e in episodes])
        embeddings = self.backbone(torch.cat([support.flatten(0, 1), query.flatten(0, 1)]))
        support_emb, query_emb = embeddings.split([support_labels.numel(), embeddings.shape[0] - support_labels.numel()])
        scores = self.scores_from_embeddings(support_emb.unflatten(0, support_labels.shape), support_labels,
                                             query_emb.unflatten(0, query.shape[:2]), episodes[0].shape.way)
        return [StepOutput(F.cross_entropy(s, e.query_labels), s) for s, e in zip(scores, episodes)]

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        """An example with more classes than the label slots (export checks a 6-way one) is folded onto them,
        labels modulo ``way``: tracing and checking need its sizes, not its classes."""
        if example.shape.way > self.way:
            example = replace(example, support_labels=example.support_labels % self.way, query_labels=example.query_labels % self.way)
        return {"embedding": embedding_graph(self.backbone, example), "classifier": classifier_graph(self, example)}
