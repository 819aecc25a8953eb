"""Embedding networks. Each takes images in [0, 1] and normalises them itself, so an exported
model carries its own preprocessing and another runtime only has to scale pixels to [0, 1]."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fsltool.errors import FsltoolError


class Normalize(nn.Module):
    """Per-channel (x - mean) / std with the statistics of the training images (stored in the data file)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def conv_block(in_channels: int, out_channels: int, *, stride: int = 1, pool: bool = True) -> nn.Sequential:
    """conv3x3 -> BatchNorm -> ReLU (-> maxpool 2x2). The conv has no bias: BatchNorm's shift replaces it."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """Normalize -> feature layers; ``flatten`` gives a vector embedding, else feature maps are kept.

    ``channels_last`` runs the convolutions in NHWC, which oneDNN computes faster on CPU
    (measured by scripts/benchmark.py); results are the same up to float rounding.
    """

    def __init__(self, normalize: Normalize, features: nn.Sequential, *, flatten: bool = True, channels_last: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self.features = features.to(memory_format=torch.channels_last) if channels_last else features
        self.flatten = flatten
        # Methods that build layers on top of the feature maps (relation module, FCE LSTMs) size them by this.
        self.out_channels = next(m.out_channels for m in reversed(list(features.modules())) if isinstance(m, nn.Conv2d))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(self.normalize(images).contiguous(memory_format=self.memory_format))
        return features.flatten(1) if self.flatten else features.contiguous()


def conv4(
    channels: int, mean: Sequence[float], std: Sequence[float], *, hidden: int = 64, flatten: bool = True, channels_last: bool = True
) -> Backbone:
    """Conv-4 (Vinyals et al. 2016; Snell et al. 2017): 4 x [conv3x3, BN, ReLU, maxpool2]; 64-d on 28x28."""
    blocks = [conv_block(channels if i == 0 else hidden, hidden) for i in range(4)]
    return Backbone(Normalize(mean, std), nn.Sequential(*blocks), flatten=flatten, channels_last=channels_last)


def conv4_strided(
    channels: int, mean: Sequence[float], std: Sequence[float], *, hidden: int = 64, flatten: bool = True, channels_last: bool = True
) -> Backbone:
    """MAML's Omniglot network (Finn et al. 2017): stride-2 convolutions instead of max-pooling."""
    blocks = [conv_block(channels if i == 0 else hidden, hidden, stride=2, pool=False) for i in range(4)]
    return Backbone(Normalize(mean, std), nn.Sequential(*blocks), flatten=flatten, channels_last=channels_last)


def conv4_relation(
    channels: int, mean: Sequence[float], std: Sequence[float], *, hidden: int = 64, flatten: bool = False, channels_last: bool = True
) -> Backbone:
    """Relation Network's Omniglot embedding (Sung et al. 2018): 4 x [conv3x3, BN, ReLU], max-pooling after the
    first two blocks only, so the relation module still has spatial maps to compare (64x7x7 on 28x28)."""
    blocks = [conv_block(channels if i == 0 else hidden, hidden, pool=i < 2) for i in range(4)]
    return Backbone(Normalize(mean, std), nn.Sequential(*blocks), flatten=flatten, channels_last=channels_last)


BACKBONES: dict[str, Callable[..., Backbone]] = {"conv4": conv4, "conv4-strided": conv4_strided, "conv4-relation": conv4_relation}


def build_backbone(name: str, channels: int, mean: Sequence[float], std: Sequence[float], **options: object) -> Backbone:
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise FsltoolError(f"unknown backbone {name!r} (available: {', '.join(BACKBONES)})") from None
    return factory(channels, mean, std, **options)
