"""What every dataset source provides to the packer."""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from fsltool.data.images import read_image_file
from fsltool.errors import BadImageError, FsltoolError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClassSpec:
    """One class of a source: its name, its split, and opaque references to its images.

    The packer never opens files itself: it hands each item back to the source's ``load``.
    That keeps the listing cheap (sizes known before any image is decoded) and memory bounded.
    """

    name: str
    split: str
    items: tuple[Hashable, ...]


@dataclass
class SourceListing:
    """Everything the packer needs from a source."""

    classes: list[ClassSpec]
    image_shape: tuple[int, int, int]  # (channels, height, width) of every loaded image
    load: Callable[[Hashable], np.ndarray]  # item -> uint8 array (C, H, W); raises BadImageError
    describe: Callable[[Hashable], str]  # item -> human-readable origin (a path) for messages
    provenance: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    """A dataset source: builds a listing from its options (paths, sizes, split rules)."""

    def __call__(self, **options: Any) -> SourceListing: ...


# Helpers shared by the sources: option checks, the seeded class split, and loading items that are image files.


def check_image_options(channels: int, size: int | None) -> None:
    """Refuse values the converter would misread silently (it treats any channels other than 1 as RGB)."""
    if channels not in (1, 3):
        raise FsltoolError(f"channels {channels!r}: must be 1 (grey) or 3 (RGB)")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise FsltoolError(f"size {size!r}: must be a positive integer, or None to keep the original size")


def require_folder(path: str, option: str) -> None:
    """A path option that must name an existing folder."""
    if not os.path.exists(path):
        raise FsltoolError(f"{option} {path}: no such folder")
    if not os.path.isdir(path):
        raise FsltoolError(f"{option} {path}: not a folder")


def check_relative_path(path: str, where: str) -> None:
    """Refuse an absolute path or one with '..' read from a file (zip member, CSV row): it could escape its root."""
    if path.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", path) or ".." in re.split(r"[/\\]", path):
        raise FsltoolError(f"{where}: refusing path {path!r} (absolute or containing '..')")


def split_by_ratios(names: Iterable[str], ratios: Sequence[float], seed: int) -> dict[str, str]:
    """Assign each class name a split: a seeded permutation of the names, cut by ``ratios`` (train, val, test).

    The permutation orders names by SHA-256 of (seed, name) rather than by a library RNG, so a split is the same on
    every platform and library version, and does not depend on the order the names were found in. Counts follow
    the largest remainder, and every split with a positive ratio gets at least one class when there are enough.
    """
    try:
        values = [float(ratio) for ratio in ratios]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise FsltoolError(
            f"split_ratios {ratios!r}: need three non-negative fractions (train, val, test) that sum to 1"
        )
    order = sorted(names, key=lambda name: hashlib.sha256(f"{seed}\0{name}".encode()).digest())
    exact = [value * len(order) for value in values]
    counts = [int(value) for value in exact]
    for i in sorted(range(3), key=lambda i: (counts[i] - exact[i], i))[: len(order) - sum(counts)]:
        counts[i] += 1
    for i in range(3):
        if values[i] > 0 and counts[i] == 0 and max(counts) > 1:
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    splits = [split for split, count in zip(SPLITS, counts) for _ in range(count)]
    return dict(zip(order, splits))


def check_image_shape(array: np.ndarray, shape: tuple[int, int, int], origin: str) -> None:
    """A loaded image must have the listing's shape; only images left at their original size can differ."""
    if array.shape != shape:
        raise FsltoolError(
            f"{origin}: image is {array.shape[2]}x{array.shape[1]} but this source's images are "
            f"{shape[2]}x{shape[1]}; pass --size to resize all images to one size"
        )


@dataclass(frozen=True)
class ImageFileLoader:
    """``load`` for sources whose items are image file paths; a plain object, so it pickles to worker processes."""

    channels: int
    size: int | None
    shape: tuple[int, int, int]

    def __call__(self, path: Hashable) -> np.ndarray:
        array = read_image_file(str(path), channels=self.channels, size=self.size)
        check_image_shape(array, self.shape, str(path))
        return array


def _first_readable_size(classes: list[ClassSpec]) -> tuple[int, int]:
    """(width, height) of the first image whose header reads: an unreadable one is for the packer to report, or
    to skip under --skip-bad, not a reason to stop listing. Raises for the first image when none reads."""
    first: BadImageError | None = None
    for item in (item for spec in classes for item in spec.items):
        try:
            with Image.open(str(item)) as image:
                return image.size
        except (OSError, SyntaxError, ValueError) as error:
            first = first or BadImageError(str(item), str(error) or type(error).__name__)
    assert first is not None  # classes hold at least one item
    raise first


def image_file_listing(
    classes: list[ClassSpec], *, channels: int, size: int | None, provenance: dict[str, Any]
) -> SourceListing:
    """The listing of a source whose items are image file paths (``classes`` must hold at least one item).

    With ``size`` None every image keeps its size, so the first image's size (read from its header, no decoding)
    sets ``image_shape`` and ``load`` refuses any image of another size.
    """
    if size is None:
        width, height = _first_readable_size(classes)
    else:
        width = height = size
    shape = (channels, height, width)
    return SourceListing(classes, shape, ImageFileLoader(channels, size, shape), str, provenance)
