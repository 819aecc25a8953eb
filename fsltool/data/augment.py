"""Training-time augmentation of assembled episodes, as batched tensor operations (one affine resampling of the
whole episode and a few element-wise colour operations), never image by image.

Every episode draws its parameters from its own generator, seeded by (run seed, meta-step, position in the
meta-batch): the draws depend neither on what ran before (a resumed run augments exactly as an uninterrupted one)
nor on how the meta-batch is split across data-parallel processes. Validation and test episodes never pass here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError

@dataclass
class AugmentConfig:
    """``train.augment``: natural = random resized crop, horizontal flip, colour jitter (RGB photos);
    padded = zero padding and a random crop back to the image's size (a shift by whole pixels, torchvision's
    RandomCrop(size, padding) as RFS and the CIFAR recipes use it), flip, colour jitter; glyph = random affine
    (rotation, scale, shift) for greyscale characters; class_rot90 = each class of an episode, support and query
    alike, turned by a random multiple of 90 degrees (MAML++'s Omniglot training, on upright classes; episodes
    only, not pretraining batches); none = off."""

    kind: str = "none"
    crop_scale: float = 0.5  # natural: a crop covers [crop_scale, 1] of the image's area (aspect 3/4 to 4/3)
    padding: float = 0.125  # padded: the padding, a fraction of the image side (4 px at 32 px, RFS's CIFAR setting)
    flip: bool = True  # natural, padded: mirror half of the images left to right
    color_jitter: float = 0.4  # natural, padded: brightness, contrast and saturation factors in [1 - j, 1 + j]
    rotation: float = 10.0  # glyph: degrees, either way
    scale: float = 0.1  # glyph: size factor in [1 - s, 1 + s]
    shift: float = 0.1  # glyph: translation, as a fraction of the image side, either way


def check_augment(config: AugmentConfig, where: str, section: str = "train") -> None:
    """Values a recipe may not hold, named by their key (in the recipe's ``train`` or ``pretrain`` section)."""
    if config.kind not in KINDS:
        raise FsltoolError(f"{where}: recipe key '{section}.augment.kind': {config.kind!r} is not one of {', '.join(KINDS)}")
    if config.kind in EPISODE_KINDS and section != "train":
        raise FsltoolError(f"{where}: recipe key '{section}.augment.kind': {config.kind} turns the classes of episodes; "
                           f"pretraining batches have none (use it in train.augment)")
    ranges = {"crop_scale": (0.01, 1.0), "padding": (0.0, 0.5), "color_jitter": (0.0, 0.99), "rotation": (0.0, 180.0), "scale": (0.0, 0.9), "shift": (0.0, 0.5)}
    for key, (low, high) in ranges.items():
        value = getattr(config, key)
        if not math.isfinite(value) or not low <= value <= high:
            raise FsltoolError(f"{where}: recipe key '{section}.augment.{key}' must be in [{low:g}, {high:g}], got {value}")


def check_augment_fits(config: AugmentConfig, image_shape: tuple[int, ...], data: str) -> None:
    """Refuse, before training, an augmentation the data's images cannot take: quarter turns keep only squares."""
    if config.kind == "class_rot90" and image_shape[-1] != image_shape[-2]:
        raise FsltoolError(f"{data}: recipe key 'train.augment.kind': class_rot90 needs square images, "
                           f"these are {image_shape[-2]}x{image_shape[-1]}")


def episode_generator(seed: int, step: int, position: int) -> torch.Generator:
    """The generator of one training episode's augmentation."""
    state = np.random.SeedSequence([seed, step, position]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _natural_theta(n: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine maps from output to input coordinates: a crop of random area and aspect at a random place,
    mirrored for half of the images."""
    area = _uniform(n, config.crop_scale, 1.0, generator)
    # Aspects are log-uniform in [3/4, 4/3], narrowed to those whose crop of this area fits the image (a <= r <= 1/a).
    limit = torch.minimum(torch.full_like(area, math.log(4 / 3)), -area.log())
    aspect = torch.exp((2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1) * limit)
    width, height = (area * aspect).sqrt(), (area / aspect).sqrt()
    centre_x = (1 - width) * _uniform(n, -1.0, 1.0, generator)
    centre_y = (1 - height) * _uniform(n, -1.0, 1.0, generator)
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double() if config.flip else torch.ones(n, dtype=torch.float64)
    zero = torch.zeros(n, dtype=torch.float64)
    return torch.stack([torch.stack([width * mirror, zero, centre_x], 1), torch.stack([zero, height, centre_y], 1)], 1)


def _padded_theta(n: int, config: AugmentConfig, generator: torch.Generator, size: tuple[int, int]) -> torch.Tensor:
    """(n, 2, 3): a shift by a whole number of pixels in [-padding, padding] each way (what a random crop of the
    zero-padded image is), mirrored for half of the images."""
    height, width = size
    pixels = int(round(config.padding * width))
    shift_x, shift_y = (torch.randint(-pixels, pixels + 1, (n,), generator=generator).double() * 2 / side for side in (width, height))
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double() if config.flip else torch.ones(n, dtype=torch.float64)
    zero = torch.zeros(n, dtype=torch.float64)
    return torch.stack([torch.stack([mirror, zero, shift_x], 1), torch.stack([zero, mirror.new_ones(n), shift_y], 1)], 1)


def _glyph_theta(n: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3): rotation by up to ``rotation`` degrees, scaling and a shift (in [-1, 1] frame units)."""
    angle = torch.deg2rad(_uniform(n, -config.rotation, config.rotation, generator))
    inverse_scale = 1 / _uniform(n, 1 - config.scale, 1 + config.scale, generator)
    shift_x, shift_y = (_uniform(n, -2 * config.shift, 2 * config.shift, generator) for _ in range(2))
    cos, sin = torch.cos(angle) * inverse_scale, torch.sin(angle) * inverse_scale
    return torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)


def _jitter_factors(n: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) brightness, contrast and saturation factors in [1 - strength, 1 + strength], float64."""
    return torch.stack([_uniform(n, 1 - strength, 1 + strength, generator) for _ in range(3)], 1)


def _color_jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and (for RGB) saturation, each a factor per image (``_jitter_factors``), clamped to [0, 1]."""
    brightness, contrast, saturation = factors.to(images.device, images.dtype).view(-1, 3, 1, 1, 1).unbind(1)
    images = images * brightness
    grey = images.mean(1, keepdim=True) if images.shape[1] == 3 else images
    images = (images - grey.mean((2, 3), keepdim=True)) * contrast + grey.mean((2, 3), keepdim=True)
    if images.shape[1] == 3:
        grey = images.mean(1, keepdim=True)
        images = (images - grey) * saturation + grey
    return images.clamp(0, 1)


@dataclass(frozen=True)
class _Kind:
    """How one augmentation kind resamples: its affine maps (n, config, generator, image side), the sampling mode,
    what lies outside the image, and whether colour jitter follows."""

    theta: Callable[[int, AugmentConfig, torch.Generator, tuple[int, int]], torch.Tensor]
    mode: str
    padding_mode: str
    jitter: bool


_KIND = {
    "natural": _Kind(lambda n, config, generator, size: _natural_theta(n, config, generator), "bilinear", "border", True),
    # whole-pixel shifts and mirrors land on pixel centres: nearest sampling copies pixels exactly, zeros outside
    "padded": _Kind(_padded_theta, "nearest", "zeros", True),
    "glyph": _Kind(lambda n, config, generator, size: _glyph_theta(n, config, generator), "bilinear", "border", False),
}
EPISODE_KINDS = ("class_rot90",)  # need an episode's classes, so train.augment only
KINDS = ("none", *_KIND, *EPISODE_KINDS)
COPIES_SEED = 1  # with an image's index, seeds its augmented copies (evaluate --support-copies)


@dataclass(frozen=True)
class AugmentDraw:
    """The random parameters of one batch's augmentation: affine maps (n, 2, 3) and colour factors (n, 3) or None."""

    theta: torch.Tensor
    jitter: torch.Tensor | None


def draw_augmentation(n: int, config: AugmentConfig, generator: torch.Generator, size: tuple[int, int]) -> AugmentDraw:
    """The parameters of ``n`` images' augmentation (kinds other than none and the episode kinds), drawn from
    ``generator`` in a fixed order: the affine maps, then the colour factors."""
    kind = _KIND[config.kind]
    theta = kind.theta(n, config, generator, size)
    return AugmentDraw(theta, _jitter_factors(n, config.color_jitter, generator) if kind.jitter and config.color_jitter else None)


def apply_augmentation(images: torch.Tensor, config: AugmentConfig, draw: AugmentDraw) -> torch.Tensor:
    """(N, C, H, W) float images in [0, 1] resampled and colour-jittered with the parameters of ``draw``."""
    kind = _KIND[config.kind]
    grid = F.affine_grid(draw.theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode=kind.mode, padding_mode=kind.padding_mode, align_corners=False)
    return images if draw.jitter is None else _color_jitter(images, draw.jitter)


def augment_images(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(N, C, H, W) float images in [0, 1] -> the same shape, augmented as ``config.kind`` says."""
    if config.kind == "none":
        return images
    return apply_augmentation(images, config, draw_augmentation(images.shape[0], config, generator, (images.shape[-2], images.shape[-1])))


def copies_generator(index: int) -> torch.Generator:
    """The generator of the augmented copies of the image stored at ``index`` (``augmented_copies``)."""
    return episode_generator(COPIES_SEED, index, 0)


def augmented_copies(images: torch.Tensor, indices: np.ndarray, copies: int, config: AugmentConfig) -> torch.Tensor:
    """(N, C, H, W) images stored at ``indices`` -> (N * copies, C, H, W): each image's ``copies`` augmented
    versions, one after the other, drawn from a generator of its own (``copies_generator``): an image gets the
    same copies in every episode and every evaluation, whatever else is evaluated with it."""
    size = (images.shape[-2], images.shape[-1])
    draws = [draw_augmentation(copies, config, copies_generator(int(index)), size) for index in indices]
    draw = AugmentDraw(torch.cat([d.theta for d in draws]), None if draws[0].jitter is None else torch.cat([d.jitter for d in draws]))
    return apply_augmentation(images.repeat_interleave(copies, 0), config, draw)


def rotate_classes(images: torch.Tensor, labels: torch.Tensor, way: int, generator: torch.Generator) -> torch.Tensor:
    """Each class's images turned by the same random multiple of 90 degrees (exact: whole-pixel rotations of square
    images), one draw per class."""
    turns = torch.randint(4, (way,), generator=generator).to(labels.device)[labels]
    every_turn = torch.stack([torch.rot90(images, quarter, dims=(-2, -1)) for quarter in range(4)])
    return every_turn[turns, torch.arange(len(images), device=images.device)]  # gathered on the device: no host sync


def augment_episode(episode: Episode, config: AugmentConfig, generator: torch.Generator) -> Episode:
    """The episode with its support and query images augmented in one batch (labels and shape unchanged)."""
    if config.kind == "none":
        return episode
    images = torch.cat([episode.support, episode.query])
    if config.kind == "class_rot90":
        images = rotate_classes(images, torch.cat([episode.support_labels, episode.query_labels]), episode.shape.way, generator)
    else:
        images = augment_images(images, config, generator)
    support_count = episode.support.shape[0]
    return Episode(images[:support_count], episode.support_labels, images[support_count:], episode.query_labels, episode.shape)
