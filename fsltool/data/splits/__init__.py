"""The standard class splits of the natural-image few-shot benchmarks, shipped as data files with their provenance.

Each ``<benchmark>-<split>.json`` here holds the class lists of one published split (see README.md for where each
comes from). ``benchmark_split`` reads one and checks it against the published counts below, so a damaged or
edited file is refused rather than silently changing a benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from fsltool.errors import FsltoolError

SPLITS = ("train", "val", "test")  # the same names as fsltool.data.sources.base, without importing numpy and PIL


@dataclass(frozen=True)
class PublishedCounts:
    """Classes per split (train, val, test) as the paper gives them, and superclasses per split where it has them."""

    classes: tuple[int, int, int]
    groups: tuple[int, int, int] | None = None


# "<benchmark>/<split>" -> the counts its file must have; the file is "<benchmark>-<split>.json".
PUBLISHED: dict[str, PublishedCounts] = {
    "miniimagenet/ravi": PublishedCounts((64, 16, 20)),
    "tieredimagenet/ren": PublishedCounts((351, 97, 160), groups=(20, 6, 8)),
    "cifar-fs/bertinetto": PublishedCounts((64, 16, 20)),
    "fc100/oreshkin": PublishedCounts((60, 20, 20), groups=(12, 4, 4)),
    "cub/chen": PublishedCounts((100, 50, 50)),
}


@dataclass(frozen=True)
class BenchmarkSplit:
    """One published split: its classes per split, their superclasses where the split is defined by them, and
    the provenance record of its file (paper, repository, path, commit)."""

    name: str
    classes: dict[str, tuple[str, ...]]
    groups: dict[str, dict[str, tuple[str, ...]]]  # split -> superclass -> its classes; empty without superclasses
    provenance: dict[str, Any]

    def split_of(self) -> dict[str, str]:
        """Class name -> its split."""
        return {name: split for split, names in self.classes.items() for name in names}


def split_names(benchmark: str) -> tuple[str, ...]:
    """The built-in splits of ``benchmark`` (e.g. ``("ravi",)`` for miniimagenet)."""
    return tuple(key.split("/", 1)[1] for key in PUBLISHED if key.split("/", 1)[0] == benchmark)


@lru_cache(maxsize=None)
def benchmark_split(name: str) -> BenchmarkSplit:
    """The split ``"<benchmark>/<split>"`` (e.g. ``"miniimagenet/ravi"``), checked against its published counts."""
    if name not in PUBLISHED:
        raise FsltoolError(f"no built-in split {name!r} (built-in: {', '.join(PUBLISHED)})")
    filename = f"{name.replace('/', '-')}.json"
    document = json.loads((resources.files(__name__) / filename).read_text(encoding="utf-8"))
    split = BenchmarkSplit(
        name=name,
        classes={s: tuple(document["splits"][s]) for s in SPLITS},
        groups={s: {g: tuple(c) for g, c in document["groups"][s].items()} for s in SPLITS} if "groups" in document else {},
        provenance={key: document[key] for key in ("benchmark", "classes_are", "source")},
    )
    _check(split, PUBLISHED[name], filename)
    return split


def _check(split: BenchmarkSplit, counts: PublishedCounts, filename: str) -> None:
    """Counts as published, no class listed twice (within or across splits), and superclasses, where given, each in
    one split and partitioning its classes (these benchmarks split by superclass so that no concept leaks)."""

    def refuse(problem: str) -> None:
        raise FsltoolError(f"built-in split file {filename}: {problem} (the installation is damaged)")

    found = tuple(len(split.classes[s]) for s in SPLITS)
    if found != counts.classes:
        refuse(f"{found} classes per split (train, val, test), published {counts.classes}")
    everything = [name for s in SPLITS for name in split.classes[s]]
    if len(set(everything)) != len(everything):
        refuse("a class is listed twice")
    if counts.groups is None:
        if split.groups:
            refuse("superclasses given for a split that has none")
        return
    found = tuple(len(split.groups.get(s, {})) for s in SPLITS)
    if found != counts.groups:
        refuse(f"{found} superclasses per split, published {counts.groups}")
    superclasses = [group for s in SPLITS for group in split.groups[s]]
    if len(set(superclasses)) != len(superclasses):
        refuse("a superclass is in two splits")
    for s in SPLITS:
        members = [name for names in split.groups[s].values() for name in names]
        if sorted(members) != sorted(split.classes[s]):
            refuse(f"the superclasses of {s} do not partition its classes")
