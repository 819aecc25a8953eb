"""Relation Networks (Sung et al. 2018): a learned relation module, not a fixed distance, scores how well a
query's feature maps match each class's, trained by regressing the scores onto 1 (same class) or 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError
from fsltool.methods.base import (
    ExportGraph,
    Method,
    StepOutput,
    class_onehot,
    classifier_graph,
    embedding_graph,
    register_method,
    require_bool,
    require_positive_int,
)
from fsltool.models.backbones import Backbone, conv_block

RELATION_FILTERS = 64  # the relation module's convolutions (paper: 64 filters)


def class_maps(support: torch.Tensor, support_labels: torch.Tensor, way: int | torch.Tensor) -> torch.Tensor:
    """(..., S, C, H, W), (..., S) -> (..., way, C, H, W): the element-wise SUM of each class's support maps,
    the paper's K-shot rule (a sum, not a mean: for 1-shot both are the same)."""
    onehot = class_onehot(support_labels, way, support.dtype)
    return (onehot.transpose(-1, -2) @ support.flatten(-3)).unflatten(-1, support.shape[-3:])


def _conv(maps: torch.Tensor, weight: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
    """A bias-free convolution over maps with any number of leading dimensions."""
    return F.conv2d(maps.flatten(0, -4), weight, padding=padding).unflatten(0, maps.shape[:-3])


class RelationModule(nn.Module):
    """concat(class maps, query maps) on channels -> 2 x [conv3x3, BN, ReLU, maxpool2] -> FC, ReLU -> FC, sigmoid.

    The first convolution sees a channel concatenation, so it equals one convolution of the class maps plus one
    of the query maps (its weight split by input channel; zero padding and no bias keep this exact). Those run
    once per class and once per query and only their sum is formed per (query, class) pair: the paper's function
    and parameters, with its costliest layer run Q + way times instead of Q x way times.

    ``padded``: the convolutions pad their maps (the authors' Omniglot code) or not (their miniImageNet code).
    ``flatten``: the FC reads the last maps flattened (the authors' code: 64x1x1 on Omniglot, 64x3x3 = 576 on
    miniImageNet), sized for the backbone's maps; otherwise their maximum over space (64 inputs), which fits any
    image size and is the flatten wherever the maps end 1x1.
    """

    def __init__(self, channels: int, hidden: int, map_size: int = 7, *, padded: bool = True, flatten: bool = False) -> None:
        super().__init__()
        self.channels, self.flatten = channels, flatten
        # The paper's two max-pools shrink 7x7 Omniglot maps to 1x1; smaller maps (a ResNet's 5x5 on 84x84, 1x1 on
        # 28x28) skip the pools that would leave nothing, so the module fits whatever the backbone gives it.
        shrink = 0 if padded else 2
        first_side = map_size - shrink
        first_pools = first_side >= 2
        second_side = (first_side // 2 if first_pools else first_side) - shrink
        second_pools = second_side >= 2
        if second_side < 1:
            raise FsltoolError(f"method 'relationnet': method_options.relation_padding: false needs feature maps of at least 8x8 "
                               f"(two unpadded 3x3 convolutions with a pool between), the backbone gives {map_size}x{map_size}")
        last_side = second_side // 2 if second_pools else second_side
        self.first = conv_block(2 * channels, RELATION_FILTERS, pool=first_pools, padding=int(padded))
        self.second = conv_block(RELATION_FILTERS, RELATION_FILTERS, pool=second_pools, padding=int(padded))
        inputs = RELATION_FILTERS * last_side * last_side if flatten else RELATION_FILTERS
        self.head = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, classes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(..., way, C, H, W), (..., Q, C, H, W) -> (..., Q, way) relation scores in (0, 1)."""
        # torch.export takes way from the label values, so it cannot tell whether BatchNorm's input (the pairs)
        # is empty and fails unless told that way > 0. (TorchScript tracing records sizes as tensors: no check.)
        if not torch.jit.is_tracing():
            torch._check(classes.shape[-4] > 0)
        conv, after_conv = self.first[0], self.first[1:]
        from_classes = _conv(classes, conv.weight[:, : self.channels], conv.padding)
        from_queries = _conv(queries, conv.weight[:, self.channels :], conv.padding)
        pairs = from_queries.unsqueeze(-4) + from_classes.unsqueeze(-5)  # (..., Q, way, F, H, W)
        maps = self.second(after_conv(pairs.flatten(0, -4)))
        return self.head(maps.flatten(1) if self.flatten else maps.amax((-2, -1))).view(pairs.shape[:-3])


@register_method("relationnet")
class RelationNet(Method):
    """Embeds images to feature maps (the backbone must keep them: conv4-relation), sums each class's support
    maps, and scores every (query, class) pair with the relation module; the highest relation wins.
    ``relation_padding`` and ``relation_flatten``: the module's convolutions padded, its FC on the maximum or the
    flattened maps (RelationModule); the authors' miniImageNet module is ``false`` / ``true``."""

    embeds_independently = True

    def __init__(self, backbone: Backbone, relation_hidden: int = 8, relation_padding: bool = True, relation_flatten: bool = False) -> None:
        super().__init__(backbone)
        if backbone.flatten:
            raise FsltoolError(
                f"method {self.name!r} compares feature maps, but the recipe's backbone flattens them: "
                "use 'backbone: conv4-relation' (or 'backbone_options: {flatten: false}')"
            )
        require_positive_int(self.name, "relation_hidden", relation_hidden)
        require_bool(self.name, "relation_padding", relation_padding)
        require_bool(self.name, "relation_flatten", relation_flatten)
        self.relation = RelationModule(backbone.out_channels, relation_hidden, min(backbone.map_shape[1:]),
                                       padded=relation_padding, flatten=relation_flatten)

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        support_maps, query_maps = self.backbone_on_episode(support, query)
        return self.relation(class_maps(support_maps, support_labels, support_labels.max() + 1), query_maps)

    def step(self, episode: Episode) -> StepOutput:
        """Mean squared error to the one-hot targets: the paper regresses relation scores rather than
        classifying, since a score says how related a pair is, not a probability over classes."""
        scores = self(episode.support, episode.support_labels, episode.query)
        return StepOutput(F.mse_loss(scores, class_onehot(episode.query_labels, episode.shape.way, scores.dtype)), scores)

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int
    ) -> torch.Tensor:
        return self.relation(class_maps(support, support_labels, way), query)

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        return {"embedding": embedding_graph(self.backbone, example), "classifier": classifier_graph(self, example)}
