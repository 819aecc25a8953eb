"""Unknown-class queries for stored episodes (open-set evaluation): for each stored episode, ``query`` images of
each of ``way`` further classes of the split, none of them among the episode's classes, stored beside its support
and query sets as ``episodes/<split>/<shape>/unknown`` (episodes, way*query).

They are a function of the stored episodes, the class index and the episode seed alone, drawn from a stream of
their own per (split, shape): a file prepared with ``--unknowns`` and one they are added to later
(``fsltool prepare unknowns``) hold the same ones, and every method meets the same unknowns.
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fsltool.atomic import atomic_path
from fsltool.data.episodes import EpisodeShape
from fsltool.disk import check_free_space, write_error
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError

UNKNOWN = "unknown"  # the dataset's name inside an episode group


def unknown_seed(seed: int, split: str, shape: EpisodeShape) -> np.random.SeedSequence:
    """An independent stream per (split, shape), apart from the episodes' own."""
    return np.random.SeedSequence([seed, zlib.crc32(f"{split}/{shape}/{UNKNOWN}".encode())])


def check_unknowns_fit(split: str, shape: EpisodeShape, split_classes: np.ndarray, class_count: np.ndarray) -> None:
    """Refuse a split too small for unknown-class queries of ``shape``: ``way`` classes outside every episode, and
    ``query`` images in each."""
    if len(split_classes) < 2 * shape.way:
        raise FsltoolError(f"split {split!r} has {len(split_classes)} classes: unknown-class queries for {shape} episodes "
                           f"need {2 * shape.way} ({shape.way} in the episode, {shape.way} outside it)")
    small = [int(c) for c in split_classes if class_count[c] < shape.query]
    if small:
        raise FsltoolError(f"split {split!r}: class {small[0]} has {class_count[small[0]]} images, fewer than the {shape.query} "
                           f"unknown queries per class of {shape} episodes")


def unknown_queries(
    support: np.ndarray, class_start: np.ndarray, class_count: np.ndarray, split_classes: np.ndarray,
    shape: EpisodeShape, seed: np.random.SeedSequence, split: str,
) -> np.ndarray:
    """(episodes, way*query) image indices: per episode, ``way`` classes of the split outside the episode's
    (drawn without replacement), ``query`` images of each, ordered class by class like the known queries."""
    check_unknowns_fit(split, shape, split_classes, class_count)
    rng = np.random.default_rng(seed)
    episode_classes = np.searchsorted(class_start, support, side="right") - 1  # classes are contiguous runs of images
    unknown = np.empty((len(support), shape.way * shape.query), dtype=np.int32)
    for row, classes in zip(unknown, episode_classes):
        outside = rng.choice(np.setdiff1d(split_classes, classes), shape.way, replace=False)
        row[:] = np.concatenate([class_start[c] + rng.choice(class_count[c], shape.query, replace=False) for c in outside])
    return unknown


def write_unknowns(group: h5py.Group, split: str, shape: EpisodeShape, seed: int, class_start: np.ndarray,
                   class_count: np.ndarray, split_classes: np.ndarray) -> None:
    """Store the unknown-class queries of the episode set in ``group`` (its ``support`` dataset is read)."""
    unknown = unknown_queries(group["support"][...], class_start, class_count, split_classes, shape,
                              unknown_seed(seed, split, shape), split)
    group.create_dataset(UNKNOWN, data=unknown)


def stored_unknowns(data: FewShotData, split: str, shape: EpisodeShape) -> np.ndarray:
    """The unknown-class query indices (episodes, way*query) stored for an episode set of ``data``, or a one-line
    error saying how to add them."""
    data.stored_episodes(split, shape)  # names the stored shapes when this one is missing
    with h5py.File(data.path, "r", locking=False) as file:
        group = file[f"episodes/{split}/{shape}"]
        if UNKNOWN not in group:
            raise FsltoolError(f"{data.path}: no unknown-class queries stored for the {split} episodes of shape {shape}; "
                               f"add them with: fsltool prepare unknowns {data.path}")
        return group[UNKNOWN][...].astype(np.int64)


@dataclass
class UnknownsReport:
    path: Path
    added: list[str]  # "split/shape" of each episode set that gained unknown-class queries
    present: list[str]  # those that held them already


def add_unknowns(data: str | Path, out: str | Path | None = None, *, force: bool = False) -> UnknownsReport:
    """Write a copy of the data file ``data`` to ``out`` (default: in place of ``data``) with unknown-class
    queries for every stored episode set that has none. The copy is written beside ``out`` and renamed over it:
    readers that have the old file open keep reading it, and a failure leaves it as it was."""
    source = Path(data)
    target = Path(out) if out is not None else source
    if target.exists() and target.resolve() != source.resolve() and not force:
        raise FsltoolError(f"{target}: already exists (pass --force to replace it)")
    with FewShotData(source, in_memory_limit=0) as reader:  # checks the format; the images are not needed
        class_start, class_count, splits = reader.class_start, reader.class_count, reader.splits
    added: list[str] = []
    present: list[str] = []
    with atomic_path(target) as temporary:
        check_free_space(temporary, source.stat().st_size, f"a copy of {source}")
        try:
            shutil.copyfile(source, temporary)
            with h5py.File(temporary, "r+", locking=False) as file:
                for split, shapes in file.get("episodes", {}).items():
                    for name, group in shapes.items():
                        (present if UNKNOWN in group else added).append(f"{split}/{name}")
                        if UNKNOWN not in group:
                            write_unknowns(group, split, EpisodeShape.parse(name), int(group.attrs["seed"]), class_start,
                                           class_count, splits[split].astype(np.int64))
                provenance = json.loads(file.attrs["provenance"])
                provenance.setdefault("episodes", {})["unknowns"] = True
                file.attrs["provenance"] = json.dumps(provenance)
        except OSError as error:
            raise write_error(target, "the data file", error) from None
    return UnknownsReport(target, added, present)
