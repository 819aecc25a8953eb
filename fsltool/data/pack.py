"""Packing a source into one HDF5 file, atomically: images, class index, splits and stored episodes."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from fsltool import __version__
from fsltool.atomic import atomic_path
from fsltool.console import progress_bar
from fsltool.data.episodes import EpisodeSampler, EpisodeShape, check_split_fits, draw_episodes
from fsltool.data.sources.base import SPLITS, SourceListing
from fsltool.data.store import FORMAT_NAME, FORMAT_VERSION
from fsltool.data.unknowns import check_unknowns_fit, write_unknowns
from fsltool.disk import check_free_space, write_error
from fsltool.errors import BadImageError, FsltoolError

DEFAULT_SHAPES = ("5w1s", "5w5s", "20w1s", "20w5s")
CHUNK_BYTES = 64 * 1024
BLOCK_BYTES = 32 * 2**20  # images decoded, written and summed per block: packing memory is bounded by this, not by a class


@dataclass(frozen=True)
class EpisodePlan:
    """Which evaluation episodes to store: the same tasks for every method, forever."""

    shapes: tuple[EpisodeShape, ...]
    splits: tuple[str, ...] = ("val", "test")
    episodes: int = 600
    seed: int = 0
    unknowns: bool = False  # also store unknown-class queries per episode (fsltool.data.unknowns), for open-set evaluation

    def generator(self, split: str, shape: EpisodeShape) -> torch.Generator:
        """One independent, stable stream per (split, shape): adding a shape never changes another's tasks."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{split}/{shape}".encode()))


@dataclass
class PackReport:
    path: str
    images: int
    classes: int
    split_classes: dict[str, int]
    skipped: list[str]


class _GuardedFile:
    """The file HDF5 writes through (h5py's fileobj driver), keeping write errors from HDF5: after a failed write
    (a full disk) HDF5 2.0 crashes the interpreter when the file is closed. The first error is kept for ``check``
    to raise, and later writes are dropped, so HDF5 closes the file cleanly and the partial file is deleted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: OSError | None = None

    def __enter__(self) -> _GuardedFile:
        self.file = open(self.path, "w+b", buffering=0)  # unbuffered: a failed write is seen at once, and only once
        return self

    def __exit__(self, *exception: object) -> None:
        self.file.close()

    def check(self) -> None:
        """Raise the first failed write's error."""
        if self.error is not None:
            raise self.error

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                self._write_all(view)
            except OSError as error:
                self.error = error
        return view.nbytes

    def _write_all(self, data: memoryview) -> None:
        while data:
            data = data[self.file.write(data):]

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.file.truncate(size)
            except OSError as error:
                self.error = error
        return size or 0

    def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        """Nothing is buffered here."""


def _validate_listing(listing: SourceListing, plan: EpisodePlan) -> None:
    if not listing.classes or not any(spec.items for spec in listing.classes):
        raise FsltoolError("the source has no images (empty source)")
    for spec in listing.classes:
        if spec.split not in SPLITS:
            raise FsltoolError(f"class {spec.name!r}: unknown split {spec.split!r} (expected one of {', '.join(SPLITS)})")
    duplicates = [name for name, n in Counter(spec.name for spec in listing.classes).items() if n > 1]
    if duplicates:
        raise FsltoolError(f"duplicate class name {duplicates[0]!r} in the source")
    for split in plan.splits:
        if split not in SPLITS:
            raise FsltoolError(f"unknown split {split!r} for stored episodes (expected one of {', '.join(SPLITS)})")
    present = {spec.split for spec in listing.classes}
    for split in ("train", *plan.splits):
        if split not in present:
            raise FsltoolError(f"split {split!r} has no classes")
    # Fail before decoding anything when a class is too small for a stored shape.
    names = [spec.name for spec in listing.classes]
    counts = np.array([len(spec.items) for spec in listing.classes])
    for split in plan.splits:
        classes = np.array([i for i, spec in enumerate(listing.classes) if spec.split == split])
        for shape in plan.shapes:
            check_split_fits(split, shape, names, counts, classes)
            if plan.unknowns:
                check_unknowns_fit(split, shape, classes, counts)


def pack(
    listing: SourceListing,
    out: str | Path,
    plan: EpisodePlan,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> PackReport:
    """Write ``listing`` to ``out`` with its splits and the stored episodes of ``plan``."""
    _validate_listing(listing, plan)
    out = Path(out)
    channels, height, width = listing.image_shape
    total = sum(len(spec.items) for spec in listing.classes)
    chunk = max(1, CHUNK_BYTES // (channels * height * width))
    skipped: list[str] = []
    with atomic_path(out, overwrite=overwrite) as temporary:
        check_free_space(out, total * channels * height * width, f"{total} images of {channels}x{height}x{width} pixels (uncompressed)")
        try:
            with _GuardedFile(temporary) as guarded, h5py.File(guarded, "w") as file:
                images = file.create_dataset(
                    "images", shape=(total, channels, height, width), maxshape=(None, channels, height, width),
                    dtype=np.uint8, chunks=(min(chunk, total), channels, height, width), compression="gzip",
                    compression_opts=4,
                )
                starts, counts, splits_of = _write_images(listing, images, guarded, skip_bad, skipped, quiet)
                _check_no_empty_class(listing, counts, skipped)
                written = int(counts.sum())
                images.resize(written, axis=0)
                names = [spec.name for spec in listing.classes]
                split_classes = _write_class_index(file, names, starts, counts, splits_of)
                mean, std = _train_statistics(images, starts, counts, split_classes["train"])
                _write_episodes(file, plan, names, starts, counts, split_classes)
                file.attrs.update(_attributes(listing, plan, (mean, std), {
                    "images": written, "classes": len(names), "split_classes": {s: len(c) for s, c in split_classes.items()},
                    "skipped_bad_images": len(skipped)}))
            guarded.check()  # HDF5 writes its metadata while closing the file
        except OSError as error:
            raise write_error(out, "the data file", error) from None
    return PackReport(str(out), written, len(names), {s: len(c) for s, c in split_classes.items()}, skipped)


def _write_class_index(file: h5py.File, names: list[str], starts: np.ndarray, counts: np.ndarray,
                       splits_of: list[str]) -> dict[str, np.ndarray]:
    """Each image's label, each class's name and image range, each split's classes; returns the latter."""
    file.create_dataset("labels", data=np.repeat(np.arange(len(names), dtype=np.int32), counts))
    file.create_dataset("classes/names", data=names, dtype=h5py.string_dtype())
    file.create_dataset("classes/start", data=starts)
    file.create_dataset("classes/count", data=counts)
    split_classes = {split: np.array([i for i, s in enumerate(splits_of) if s == split], dtype=np.int32) for split in SPLITS}
    for split, classes in split_classes.items():
        file.create_dataset(f"splits/{split}", data=classes)
    return split_classes


def _attributes(listing: SourceListing, plan: EpisodePlan, statistics: tuple[np.ndarray, np.ndarray],
                written: dict[str, Any]) -> dict[str, Any]:
    """The file's attributes: format, versions, the training split's normalisation ``statistics`` (mean, std), and
    the provenance: the source's own, what was ``written``, and the stored episodes' plan."""
    mean, std = statistics
    provenance = {**listing.provenance, **written,
                  "episodes": {"shapes": [str(s) for s in plan.shapes], "splits": list(plan.splits), "count": plan.episodes,
                               "seed": plan.seed, "unknowns": plan.unknowns}}
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "fsltool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "normalization_mean": mean,
            "normalization_std": std, "provenance": json.dumps(provenance)}


def _write_images(
    listing: SourceListing, images: h5py.Dataset, guarded: _GuardedFile, skip_bad: bool, skipped: list[str], quiet: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode class by class into ``images`` (contiguous per class), ``BLOCK_BYTES`` at a time; returns the class index."""
    starts = np.zeros(len(listing.classes), dtype=np.int64)
    counts = np.zeros(len(listing.classes), dtype=np.int64)
    rows = _block_rows(images)
    position = 0
    with progress_bar(quiet=quiet) as progress:
        task = progress.add_task("packing images", total=images.shape[0])
        for index, spec in enumerate(listing.classes):
            starts[index] = position
            block: list[np.ndarray] = []
            for item in spec.items:
                try:
                    array = listing.load(item)
                except BadImageError:
                    if not skip_bad:
                        raise
                    skipped.append(listing.describe(item))
                    continue
                if array.shape != tuple(images.shape[1:]) or array.dtype != np.uint8:
                    raise FsltoolError(
                        f"{listing.describe(item)}: image of shape {array.shape}, expected {tuple(images.shape[1:])}"
                    )
                block.append(array)
                if len(block) == rows:
                    position = _flush(images, block, position, guarded)
                progress.advance(task)
            position = _flush(images, block, position, guarded)
            counts[index] = position - starts[index]
    return starts, counts, [spec.split for spec in listing.classes]


def _check_no_empty_class(listing: SourceListing, counts: np.ndarray, skipped: list[str]) -> None:
    """A class without images cannot supply any episode: refuse it now rather than when training samples it."""
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        spec = listing.classes[int(empty[0])]
        after = " left after skipping unreadable ones" if skipped else ""
        more = f" ({len(empty)} such classes)" if len(empty) > 1 else ""
        raise FsltoolError(f"class {spec.name!r} ({spec.split}) has no images{after}{more}")


def _block_rows(images: h5py.Dataset) -> int:
    return max(1, BLOCK_BYTES // int(np.prod(images.shape[1:])))


def _flush(images: h5py.Dataset, block: list[np.ndarray], position: int, guarded: _GuardedFile) -> int:
    """Write ``block`` at ``position`` and empty it; returns the next position. Stops at the first failed write."""
    if block:
        images[position : position + len(block)] = np.stack(block)
        guarded.check()
        position += len(block)
        block.clear()
    return position


def _train_statistics(
    images: h5py.Dataset, starts: np.ndarray, counts: np.ndarray, train_classes: np.ndarray
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images in [0, 1], streamed in blocks of ``BLOCK_BYTES`` as float64."""
    channels = images.shape[1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    n = 0
    rows = max(1, _block_rows(images) // 8)
    for cls in train_classes:
        for first in range(starts[cls], starts[cls] + counts[cls], rows):
            block = images[first : min(first + rows, starts[cls] + counts[cls])].astype(np.float64) / 255.0
            total += block.sum(axis=(0, 2, 3))
            squares += (block**2).sum(axis=(0, 2, 3))
            n += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(squares / max(n, 1) - mean**2, 1e-12))
    return mean.tolist(), std.tolist()


def _write_episodes(
    file: h5py.File,
    plan: EpisodePlan,
    names: Sequence[str],
    starts: np.ndarray,
    counts: np.ndarray,
    split_classes: dict[str, np.ndarray],
) -> None:
    for split in plan.splits:
        classes = split_classes[split].astype(np.int64)
        for shape in plan.shapes:
            check_split_fits(split, shape, list(names), counts, classes)
            sampler = EpisodeSampler(starts, counts, classes, shape, plan.generator(split, shape))
            support, query = draw_episodes(sampler, plan.episodes)
            group = file.create_group(f"episodes/{split}/{shape}")
            group.create_dataset("support", data=support)
            group.create_dataset("query", data=query)
            group.attrs.update({"way": shape.way, "shot": shape.shot, "query": shape.query, "seed": plan.seed})
            if plan.unknowns:
                write_unknowns(group, split, shape, plan.seed, starts, counts, classes)
