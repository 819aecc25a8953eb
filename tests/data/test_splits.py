"""The built-in benchmark class splits: published counts, disjoint splits, provenance, and the miniImageNet list
equal to the Ravi CSVs it was derived from."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fsltool.data.splits import PUBLISHED, benchmark_split, split_names
from fsltool.errors import FsltoolError

RAVI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "miniimagenet" / "splits" / "ravi"


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_each_split_has_its_published_counts_and_provenance(name: str) -> None:
    split = benchmark_split(name)
    assert tuple(len(split.classes[s]) for s in ("train", "val", "test")) == PUBLISHED[name].classes
    names = [c for s in ("train", "val", "test") for c in split.classes[s]]
    assert len(set(names)) == len(names)
    assert split.provenance["source"]["repository"].startswith("https://github.com/")


@pytest.mark.skipif(not RAVI.is_dir(), reason="needs ../shared/data/miniimagenet")
def test_miniimagenet_classes_are_the_ravi_csv_labels() -> None:
    split = benchmark_split("miniimagenet/ravi")
    for part in ("train", "val", "test"):
        with (RAVI / f"{part}.csv").open() as file:
            labels = {row["label"] for row in csv.DictReader(file)}
        assert set(split.classes[part]) == labels


def test_unknown_split_is_a_one_line_error() -> None:
    with pytest.raises(FsltoolError, match="no built-in split 'miniimagenet/vinyals'"):
        benchmark_split("miniimagenet/vinyals")
    assert split_names("miniimagenet") == ("ravi",)
