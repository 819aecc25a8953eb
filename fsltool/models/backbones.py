"""Embedding networks. Each takes images in [0, 1] and normalises them itself, so an exported
model carries its own preprocessing and another runtime only has to scale pixels to [0, 1]."""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
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


def conv_block(in_channels: int, out_channels: int, *, stride: int = 1, pool: bool = True, relu: bool = True,
               bn_eps: float = 1e-5, pool_ceil: bool = False, pad_after: bool = False, padding: int = 1) -> nn.Sequential:
    """conv3x3 -> BatchNorm -> ReLU (-> maxpool 2x2), the papers' block. The conv has no bias: BatchNorm's shift
    replaces it. The pool runs before the ReLU: ReLU is monotone, so max(relu) = relu(max) bit for bit, gradients
    included, and the ReLU and its backward then touch a quarter of the map (docs/speed.md). ``pool_ceil``: the pool
    keeps an odd map's last row and column (TensorFlow's 'SAME' pooling); ``pad_after``: the conv pads one zero row
    and column after the map and none before (TensorFlow's 'SAME' for a stride-2 conv on an even map); ``padding``
    0: an unpadded conv (Relation Networks' code)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=0 if pad_after else padding, bias=False),
        nn.BatchNorm2d(out_channels, eps=bn_eps),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=pool_ceil))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    named = [(str(index), layer) for index, layer in enumerate(layers)]  # the parameters' names whatever the padding
    return nn.Sequential(OrderedDict([("pad", nn.ZeroPad2d((0, 1, 0, 1)))] * pad_after + named))


WEIGHT_INITS = ("torch", "glorot")


def conv4_family_blocks(blocks: list[nn.Sequential], weight_init: str, bn_scale: bool) -> nn.Sequential:
    """The blocks as the feature layers, their convolutions initialised by ``weight_init``: torch's default, or
    Glorot (Xavier) uniform, TensorFlow's default and the MAML and Reptile reference code's. ``bn_scale: false``
    fixes every BatchNorm's scale at 1 (a buffer, not a parameter: nothing learns or adapts it), leaving the shift,
    as TensorFlow's ``tf.contrib.layers.batch_norm`` defaults in MAML's code (center, no scale)."""
    if weight_init not in WEIGHT_INITS:
        raise FsltoolError(f"backbone_options.weight_init must be one of {', '.join(WEIGHT_INITS)}, got {weight_init!r}")
    if not isinstance(bn_scale, bool):
        raise FsltoolError(f"backbone_options.bn_scale must be true or false, got {bn_scale!r}")
    features = nn.Sequential(*blocks)
    for module in features.modules():
        if isinstance(module, nn.Conv2d) and weight_init == "glorot":
            nn.init.xavier_uniform_(module.weight)
        if isinstance(module, nn.BatchNorm2d) and not bn_scale:
            scale = module.weight.detach()
            del module.weight
            module.register_buffer("weight", scale)  # the same state_dict key: forward reads it as before
    return features


class Backbone(nn.Module):
    """Normalize -> feature layers -> an embedding: the maps flattened (``flatten``, the Conv-4 papers' 1600-d
    vector on 84x84), their global average (``pool``, ResNets), or the maps themselves (``flatten: false``).

    ``image_size`` is the side of the images the backbone is built for: methods that put layers on top of the
    embedding (FCE, SNAIL, MANN, the relation module) size them from ``embedding_shape``, measured by running one
    blank image through the network. ``channels_last`` runs the convolutions in NHWC, which oneDNN computes
    faster on CPU (measured by scripts/benchmark.py); results are the same up to float rounding.
    """

    def __init__(self, normalize: Normalize, features: nn.Module, *, flatten: bool = True, pool: bool = False,
                 channels_last: bool = True, image_size: int = 28) -> None:
        super().__init__()
        for key, value in (("flatten", flatten), ("pool", pool), ("channels_last", channels_last)):
            if not isinstance(value, bool):
                raise FsltoolError(f"backbone_options.{key} must be true or false, got {value!r}")
        self.normalize = normalize
        self.features = features.to(memory_format=torch.channels_last) if channels_last else features
        self.flatten = flatten
        self.pool = pool
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.frozen: tuple[str, ...] = ()  # names of feature stages kept fixed (set by ``freeze``)
        self.frozen_statistics = False  # every BatchNorm normalises with its running statistics (``freeze_statistics``)
        self.image_size = image_size
        self.map_shape = self._probe_map_shape(normalize.mean.shape[1], image_size)
        self.out_channels = self.map_shape[0]
        self.embedding_shape = self.map_shape if not flatten else (self.map_shape[0],) if pool else (math.prod(self.map_shape),)
        self.embedding_size = math.prod(self.embedding_shape)

    def _probe_map_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        """The feature maps' (C, H, W) on one blank image, in eval mode so no BatchNorm statistic moves."""
        was_training = self.features.training
        self.features.eval()
        try:
            with torch.no_grad():
                maps = self.features(torch.zeros(1, channels, image_size, image_size).contiguous(memory_format=self.memory_format))
        except RuntimeError:  # a pooling layer left with nothing to pool
            maps = torch.zeros(0)
        self.features.train(was_training)
        if maps.dim() != 4 or 0 in maps.shape:
            raise FsltoolError(f"backbone: {image_size}x{image_size} images are too small for it")
        return tuple(maps.shape[1:])  # type: ignore[return-value]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(self.normalize(images).contiguous(memory_format=self.memory_format))
        if not self.flatten:
            return features.contiguous()
        return features.mean((-2, -1)) if self.pool else features.flatten(1)

    def stages(self) -> dict[str, nn.Module]:
        """The named top-level stages of the feature network (what ``freeze`` may list)."""
        return dict(self.features.named_children())

    def freeze(self, stages: bool | list[str]) -> None:
        """Keep these stages' parameters fixed (no gradient) and their BatchNorm statistics too (eval mode
        whatever ``train()`` says), so a frozen pretrained stage computes exactly what it computed before."""
        available = self.stages()
        if stages is True:
            names = list(available)
        elif stages is False:
            names = []
        elif isinstance(stages, list) and all(isinstance(name, str) for name in stages):
            unknown = [name for name in stages if name not in available]
            if unknown:
                raise FsltoolError(f"backbone_options.freeze: no stage {unknown[0]!r} (stages: {', '.join(available)})")
            names = list(stages)
        else:
            raise FsltoolError(f"backbone_options.freeze must be true, false or a list of stage names, got {stages!r}")
        for name in names:
            available[name].requires_grad_(False)
        self.frozen = tuple(names)
        self.train(self.training)

    def freeze_statistics(self, frozen: bool) -> None:
        """Normalise with the BatchNorm running statistics in training as in evaluation, and leave them as they are
        (the layers' scale and shift still train): a pretrained backbone fine-tuned on small episodes then sees the
        same normalisation in both, instead of each episode's batch statistics in training only."""
        if not isinstance(frozen, bool):
            raise FsltoolError(f"backbone_options.freeze_statistics must be true or false, got {frozen!r}")
        self.frozen_statistics = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        stages = self.stages()
        for name in self.frozen:
            stages[name].eval()
        if self.frozen_statistics:
            for module in self.features.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def conv4(channels: int, mean: Sequence[float], std: Sequence[float], *, hidden: int = 64, final_relu: bool = True,
          bn_eps: float = 1e-5, pool_ceil: bool = False, weight_init: str = "torch", bn_scale: bool = True, **layout: Any) -> Backbone:
    """Conv-4 (Vinyals et al. 2016; Snell et al. 2017): 4 x [conv3x3, BN, ReLU, maxpool2]; 64-d on 28x28,
    1600-d (64 x 5 x 5 flattened, as the papers) on 84x84, or 64-d there with ``pool: true``. ``final_relu: false``
    leaves the last block's ReLU out: an embedding that can be negative, so cosine similarities (Matching Networks)
    span [-1, 1] instead of [0, 1]; the parameters are the same. ``bn_eps`` is every BatchNorm's epsilon (PyTorch's
    1e-5; the TensorFlow reference code of MAML and Reptile had 1e-3), in all three Conv-4 variants. ``pool_ceil``
    rounds odd maps up when pooling, as TensorFlow's 'SAME' pooling in Reptile's miniImageNet network (84 px: 6x6
    last maps, not 5x5). ``weight_init: glorot`` (all three variants): Glorot uniform convolutions, as TensorFlow;
    ``bn_scale: false`` (all three): BatchNorm without a learned scale, as MAML's code (``conv4_family_blocks``)."""
    hidden, bn_eps = _positive_int("hidden", hidden), _positive_float("bn_eps", bn_eps)
    for key, value in (("final_relu", final_relu), ("pool_ceil", pool_ceil)):
        if not isinstance(value, bool):
            raise FsltoolError(f"backbone_options.{key} must be true or false, got {value!r}")
    blocks = [conv_block(channels if i == 0 else hidden, hidden, relu=final_relu or i < 3, bn_eps=bn_eps, pool_ceil=pool_ceil)
              for i in range(4)]
    return Backbone(Normalize(mean, std), conv4_family_blocks(blocks, weight_init, bn_scale), **layout)


def conv4_strided(channels: int, mean: Sequence[float], std: Sequence[float], *, hidden: int = 64, bn_eps: float = 1e-5,
                  tf_same_padding: bool = False, weight_init: str = "torch", bn_scale: bool = True, **layout: Any) -> Backbone:
    """MAML's Omniglot network (Finn et al. 2017): stride-2 convolutions instead of max-pooling. ``tf_same_padding``
    pads as TensorFlow's 'SAME' (MAML's and Reptile's code): on an even map one zero row and column after it and
    none before, on an odd one one each side (PyTorch's padding 1 always pads both sides); chosen per layer from
    the image size the backbone is built for."""
    hidden, bn_eps = _positive_int("hidden", hidden), _positive_float("bn_eps", bn_eps)
    if not isinstance(tf_same_padding, bool):
        raise FsltoolError(f"backbone_options.tf_same_padding must be true or false, got {tf_same_padding!r}")
    sides = [layout.get("image_size", 28)]
    for _ in range(3):
        sides.append(-(-sides[-1] // 2))
    blocks = [conv_block(channels if i == 0 else hidden, hidden, stride=2, pool=False, bn_eps=bn_eps,
                         pad_after=tf_same_padding and side % 2 == 0) for i, side in enumerate(sides)]
    return Backbone(Normalize(mean, std), conv4_family_blocks(blocks, weight_init, bn_scale), **layout)


def conv4_relation(channels: int, mean: Sequence[float], std: Sequence[float], *, hidden: int = 64, flatten: bool = False,
                   bn_eps: float = 1e-5, pad_first_two: bool = True, weight_init: str = "torch", bn_scale: bool = True,
                   **layout: Any) -> Backbone:
    """Relation Network's Omniglot embedding (Sung et al. 2018): 4 x [conv3x3, BN, ReLU], max-pooling after the
    first two blocks only, so the relation module still has spatial maps to compare (64x7x7 on 28x28).
    ``pad_first_two: false`` leaves the first two convolutions unpadded, as the authors' code (Omniglot and
    miniImageNet): 64x5x5 maps on 28x28, 64x19x19 on 84x84."""
    hidden, bn_eps = _positive_int("hidden", hidden), _positive_float("bn_eps", bn_eps)
    if not isinstance(pad_first_two, bool):
        raise FsltoolError(f"backbone_options.pad_first_two must be true or false, got {pad_first_two!r}")
    blocks = [conv_block(channels if i == 0 else hidden, hidden, pool=i < 2, bn_eps=bn_eps, padding=int(pad_first_two or i >= 2))
              for i in range(4)]
    return Backbone(Normalize(mean, std), conv4_family_blocks(blocks, weight_init, bn_scale), flatten=flatten, **layout)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): in training, zero ``block_size`` x ``block_size`` squares of each channel's
    map, drawn for every channel on its own (the paper's Algorithm 1, MetaOptNet's and RFS's code), so that about
    the current rate of it is dropped, and rescale what is kept; the identity in eval mode. The current rate is
    ``drop_rate``, or with ``ramp`` > 0 rises linearly from 0 to it over the first ``ramp`` optimizer updates
    (set by `ramp_dropblocks` from the training loop's count, so a resumed run continues the ramp exactly). Its
    random draws come from torch's global generator, which checkpoints save, so a resumed run draws the same blocks."""

    def __init__(self, drop_rate: float, block_size: int, ramp: int = 0) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.block_size = block_size
        self.ramp = ramp
        self.rate = 0.0 if ramp else drop_rate

    def ramp_to(self, updates_done: int) -> None:
        """The rate for the update after ``updates_done`` updates."""
        if self.ramp:
            self.rate = self.drop_rate * min(1.0, updates_done / self.ramp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        height, width = x.shape[-2:]
        block = min(self.block_size, height, width)
        valid = (height - block + 1) * (width - block + 1)
        gamma = self.rate * height * width / (block * block * valid)
        seeds = torch.rand(*x.shape[:2], height - block + 1, width - block + 1, device=x.device, dtype=x.dtype) < gamma
        pad = block - 1
        seeds = F.pad(seeds.to(x.dtype), (pad, pad, pad, pad))
        dropped = F.max_pool2d(seeds, block, stride=1) if pad else seeds  # (height, width): each seed's whole block
        keep = 1 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


def ramped_dropblocks(model: nn.Module) -> list[DropBlock]:
    """The DropBlocks of ``model`` whose rate ramps up: a training loop finds them once, then sets them before every
    update with ``ramp_dropblocks`` (nothing to do in a step when there are none)."""
    return [module for module in model.modules() if isinstance(module, DropBlock) and module.ramp]


def ramp_dropblocks(blocks: Sequence[DropBlock], updates_done: int) -> None:
    """Set each block to its rate for the update after ``updates_done`` updates."""
    for block in blocks:
        block.ramp_to(updates_done)


class ResNet12Block(nn.Module):
    """3 x conv3x3-BN (LeakyReLU 0.1 between), a 1x1 conv-BN shortcut, LeakyReLU, maxpool 2x2 (MetaOptNet, FEAT)."""

    def __init__(self, in_channels: int, out_channels: int, drop: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.pool = nn.MaxPool2d(2)
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        return self.drop(self.pool(F.leaky_relu(out + self.shortcut(x), 0.1)))


def resnet12(channels: int, mean: Sequence[float], std: Sequence[float], *, widths: Sequence[int] = (64, 160, 320, 640),
             drop_rate: float = 0.0, drop_block_size: int = 5, drop_ramp: int = 0, early_dropout: float = 0.0, pool: bool = True,
             **layout: Any) -> Backbone:
    """The few-shot ResNet-12 (Lee et al. 2019, MetaOptNet; Ye et al. 2020, FEAT): four residual stages
    ``stage1``..``stage4``, each halving the maps (84 -> 42 -> 21 -> 10 -> 5), then global average pooling to a 640-d vector.
    ``drop_rate`` > 0 adds DropBlock after the last two stages (MetaOptNet: 0.1, blocks of 5), ``drop_ramp`` > 0
    ramping its rate up over that many optimizer updates; ``early_dropout`` > 0 plain dropout after the first two
    (MetaOptNet's and RFS's code: the same rate as their DropBlock)."""
    widths = _positive_ints("widths", widths, length=4)
    for key, rate in (("drop_rate", drop_rate), ("early_dropout", early_dropout)):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise FsltoolError(f"backbone_options.{key} must be a number in [0, 1), got {rate!r}")
    _positive_ints("drop_block_size", [drop_block_size], length=1)
    if isinstance(drop_ramp, bool) or not isinstance(drop_ramp, int) or drop_ramp < 0:
        raise FsltoolError(f"backbone_options.drop_ramp must be a whole number of optimizer updates (0: none), got {drop_ramp!r}")
    if drop_ramp and not drop_rate:
        raise FsltoolError("backbone_options.drop_ramp ramps DropBlock up: it needs backbone_options.drop_rate > 0")
    stages = nn.Sequential()
    for index, width in enumerate(widths):
        drop: nn.Module | None = None
        if index >= 2 and drop_rate:
            drop = DropBlock(float(drop_rate), drop_block_size, drop_ramp)
        elif index < 2 and early_dropout:
            drop = nn.Dropout(float(early_dropout))
        stages.add_module(f"stage{index + 1}", ResNet12Block(channels if index == 0 else widths[index - 1], width, drop))
    return Backbone(Normalize(mean, std), stages, pool=pool, **layout)


class WideBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis 2016): BN-ReLU-conv3x3 twice, 1x1 shortcut when
    the width or stride changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + (self.shortcut(activated) if self.shortcut is not None else x)


def wrn28_10(channels: int, mean: Sequence[float], std: Sequence[float], *, depth: int = 28, widen: int = 10,
             pool: bool = True, **layout: Any) -> Backbone:
    """Wide ResNet 28-10 (as in LEO, Rusu et al. 2019, and S2M2, Mangla et al. 2020): a 16-channel stem, three
    stages of (depth - 4) / 6 wide blocks at 16/32/64 x ``widen`` channels (strides 1, 2, 2), BN-ReLU, average
    pooling to a 640-d vector."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise FsltoolError(f"backbone_options.depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth!r}")
    (widen,) = _positive_ints("widen", [widen], length=1)
    blocks_per_stage = (depth - 4) // 6
    widths = [16 * widen, 32 * widen, 64 * widen]
    layers = nn.Sequential()
    layers.add_module("stem", nn.Conv2d(channels, 16, 3, padding=1, bias=False))
    in_channels = 16
    for index, (width, stride) in enumerate(zip(widths, (1, 2, 2))):
        blocks = [WideBlock(in_channels if b == 0 else width, width, stride if b == 0 else 1) for b in range(blocks_per_stage)]
        layers.add_module(f"stage{index + 1}", nn.Sequential(*blocks))
        in_channels = width
    layers.add_module("final", nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)))
    return Backbone(Normalize(mean, std), layers, pool=pool, **layout)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block, with its parameter names (conv1, bn1, conv2, bn2, downsample.0/1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))
                           if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def resnet18(channels: int, mean: Sequence[float], std: Sequence[float], *, pool: bool = True, **layout: Any) -> Backbone:
    """ResNet-18 (He et al. 2016) with torchvision's module names (conv1, bn1, layer1..layer4), so a torchvision
    ``resnet18`` state_dict loads with ``backbone_options.weights`` (its ``fc`` classifier is left out)."""
    layers = nn.Sequential()
    layers.add_module("conv1", nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False))
    layers.add_module("bn1", nn.BatchNorm2d(64))
    layers.add_module("relu", nn.ReLU(inplace=True))
    layers.add_module("maxpool", nn.MaxPool2d(3, stride=2, padding=1))
    in_channels = 64
    for index, width in enumerate((64, 128, 256, 512)):
        stride = 1 if index == 0 else 2
        layers.add_module(f"layer{index + 1}", nn.Sequential(BasicBlock(in_channels, width, stride), BasicBlock(width, width, 1)))
        in_channels = width
    return Backbone(Normalize(mean, std), layers, pool=pool, **layout)


def _positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FsltoolError(f"backbone_options.{key} must be a positive integer, got {value!r}")
    return value


def _positive_float(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise FsltoolError(f"backbone_options.{key} must be a positive number, got {value!r}")
    return float(value)


def _positive_ints(key: str, values: object, *, length: int) -> list[int]:
    """A recipe's list of layer sizes, checked: parsed YAML may hold strings, bools or the wrong count."""
    if (not isinstance(values, (list, tuple)) or len(values) != length
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)):
        raise FsltoolError(f"backbone_options.{key} must be {length} positive integer(s), got {values!r}")
    return list(values)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "conv4": conv4, "conv4-strided": conv4_strided, "conv4-relation": conv4_relation,
    "resnet12": resnet12, "wrn28-10": wrn28_10, "resnet18": resnet18,
}
# Keys of a checkpoint file that belong to a classifier on top of the backbone, not to it: left out on loading.
HEAD_KEYS: dict[str, tuple[str, ...]] = {"resnet18": ("fc.",)}
# backbone_options handled here, not by the factories.
LOADING_OPTIONS = ("weights", "freeze", "freeze_statistics")


def build_backbone(name: str, channels: int, mean: Sequence[float], std: Sequence[float], *, image_size: int = 28,
                   **options: Any) -> Backbone:
    """The named backbone for ``image_size`` images. ``freeze`` and ``freeze_statistics`` are applied here; ``weights`` (a file) is loaded
    only when a run starts (fsltool.models.weights), never when a trained run is rebuilt from its checkpoint."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise FsltoolError(f"unknown backbone {name!r} (available: {', '.join(BACKBONES)})") from None
    structural = {key: value for key, value in options.items() if key not in LOADING_OPTIONS}
    accepted = _factory_options(factory)
    for key in structural:
        if key not in accepted:
            raise FsltoolError(f"backbone {name!r} has no option {key!r} (accepted: {', '.join(accepted + list(LOADING_OPTIONS))})")
    backbone = factory(channels, mean, std, image_size=image_size, **structural)
    if "freeze" in options:
        backbone.freeze(options["freeze"])
    if "freeze_statistics" in options:
        backbone.freeze_statistics(options["freeze_statistics"])
    return backbone


def _factory_options(factory: Callable[..., Backbone]) -> list[str]:
    """The options a backbone accepts: its factory's keywords plus the Backbone layout keys."""
    own = [key for key, p in inspect.signature(factory).parameters.items() if p.kind is p.KEYWORD_ONLY]
    layout = [key for key in ("flatten", "pool", "channels_last") if key not in own]
    return own + layout
