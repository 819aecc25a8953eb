from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from fsltool.data.episodes import EpisodeShape
from fsltool.data.pack import EpisodePlan, pack
from fsltool.data.sources.base import ClassSpec, SourceListing
from fsltool.data.sources.folder import folder
from fsltool.data.store import FewShotData
from fsltool.errors import BadImageError, FsltoolError
from tests.conftest import small_plan


def array_listing(per_split: dict[str, int], images: int = 8, fail_on: Hashable | None = None) -> SourceListing:
    """Classes of constant images (value = class index) so contents are easy to check."""
    classes = []
    for split, count in per_split.items():
        for _ in range(count):
            index = len(classes)
            classes.append(ClassSpec(f"c{index}", split, tuple((index, i) for i in range(images))))

    def load(item: Hashable) -> np.ndarray:
        if item == fail_on:
            raise BadImageError(f"file{item}", "broken")
        return np.full((1, 6, 6), item[0], dtype=np.uint8)  # type: ignore[index]

    return SourceListing(classes, (1, 6, 6), load, lambda item: f"file{item}", {"source": "test"})


def plan(*shapes: str, episodes: int = 12) -> EpisodePlan:
    return EpisodePlan(shapes=tuple(EpisodeShape.parse(s) for s in shapes), episodes=episodes)


def test_packed_file_holds_images_classes_splits_and_consistent_episodes(tmp_path: Path) -> None:
    out = tmp_path / "d.h5"
    report = pack(array_listing({"train": 6, "val": 4, "test": 5}), out, plan("3w2s4q"), quiet=True)
    assert report.images == 15 * 8 and report.split_classes == {"train": 6, "val": 4, "test": 5}
    with h5py.File(out) as file:
        assert file["images"].dtype == np.uint8 and file["images"].shape == (120, 1, 6, 6)
        assert file.attrs["format_version"] == 1
    with FewShotData(out) as data:
        assert set(data.splits["train"]) | set(data.splits["val"]) | set(data.splits["test"]) == set(range(15))
        assert data.provenance["source"] == "test" and data.provenance["images"] == 120
        shape = EpisodeShape(3, 2, 4)
        support, query = data.stored_episodes("test", shape)
        assert support.shape == (12, 6) and query.shape == (12, 12)
        test_classes = set(data.splits["test"].tolist())
        for s, q in zip(support, query):
            episode = data.episode(s, q, shape)
            # constant images: pixel value * 255 is the class index, so labels must match classes
            support_class = (episode.support[:, 0, 0, 0] * 255).round().long()
            query_class = (episode.query[:, 0, 0, 0] * 255).round().long()
            assert set(support_class.tolist()) <= test_classes
            for label in range(3):
                assert len(set(support_class[episode.support_labels == label].tolist())) == 1
                assert set(query_class[episode.query_labels == label].tolist()) == set(support_class[episode.support_labels == label].tolist())


def test_stored_episodes_are_reproducible_and_independent_of_other_shapes(tmp_path: Path) -> None:
    listing = array_listing({"train": 6, "val": 4, "test": 5})
    pack(listing, tmp_path / "a.h5", plan("3w1s2q"), quiet=True)
    pack(listing, tmp_path / "b.h5", plan("3w1s2q", "2w2s2q"), quiet=True)
    with FewShotData(tmp_path / "a.h5") as a, FewShotData(tmp_path / "b.h5") as b:
        shape = EpisodeShape(3, 1, 2)
        for x, y in zip(a.stored_episodes("test", shape), b.stored_episodes("test", shape)):
            np.testing.assert_array_equal(x, y)


def test_failure_midway_leaves_no_file_and_keeps_existing_one(tmp_path: Path) -> None:
    out = tmp_path / "d.h5"
    broken = array_listing({"train": 3, "val": 3, "test": 3}, fail_on=(4, 3))
    with pytest.raises(BadImageError, match=r"file\(4, 3\)"):
        pack(broken, out, plan("2w1s1q"), quiet=True)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"precious")
    with pytest.raises(FsltoolError, match="already exists"):
        pack(array_listing({"train": 3, "val": 3, "test": 3}), out, plan("2w1s1q"), quiet=True)
    with pytest.raises(BadImageError):
        pack(broken, out, plan("2w1s1q"), quiet=True, overwrite=True)
    assert out.read_bytes() == b"precious" and list(tmp_path.iterdir()) == [out]


def test_skip_bad_counts_skipped_images(tmp_path: Path) -> None:
    report = pack(array_listing({"train": 3, "val": 3, "test": 3}, fail_on=(4, 3)), tmp_path / "d.h5", plan("2w1s1q"), quiet=True, skip_bad=True)
    assert report.skipped == ["file(4, 3)"] and report.images == 9 * 8 - 1


def test_corrupt_image_file_is_named(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for name in "abcdefgh":
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (10, 10), color=i * 40).save(root / name / f"{i}.png")
    (root / "c" / "2.png").write_bytes(b"not a png at all")
    listing = folder(root=str(root), channels=1, split_ratios=(0.5, 0.25, 0.25))
    with pytest.raises(BadImageError, match=r"c/2\.png: unreadable image"):
        pack(listing, tmp_path / "d.h5", plan("2w1s1q"), quiet=True)
    assert not (tmp_path / "d.h5").exists()


@pytest.mark.parametrize(
    ("listing", "message"),
    [
        (SourceListing([], (1, 6, 6), lambda i: np.zeros((1, 6, 6), np.uint8), str), "empty source"),
        (array_listing({"train": 3, "holdout": 3, "val": 3, "test": 3}), "unknown split 'holdout'"),
        (array_listing({"train": 3, "test": 3}), "split 'val' has no classes"),
        (array_listing({"train": 3, "val": 3, "test": 3}, images=3), r"class 'c3' \(val\) has 3 images, fewer than shot \+ query = 4 for 2w2s2q"),
    ],
)
def test_bad_sources_fail_before_writing(tmp_path: Path, listing: SourceListing, message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        pack(listing, tmp_path / "d.h5", plan("2w2s2q"), quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_unknown_split_for_episodes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match="unknown split 'tset'"):
        pack(array_listing({"train": 3, "val": 3, "test": 3}), tmp_path / "d.h5",
             EpisodePlan(shapes=(EpisodeShape(2, 1, 1),), splits=("val", "tset")), quiet=True)


def test_store_rejects_foreign_and_truncated_files(tmp_path: Path, synthetic_file: Path) -> None:
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as file:
        file["x"] = [1, 2, 3]
    with pytest.raises(FsltoolError, match="not an fsltool data file"):
        FewShotData(foreign)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(synthetic_file.read_bytes()[:5000])
    with pytest.raises(FsltoolError, match="truncated.h5"):
        FewShotData(truncated)
    with pytest.raises(FsltoolError, match="not found"):
        FewShotData(tmp_path / "missing.h5")


def test_lazy_reads_match_in_memory_reads(synthetic_file: Path) -> None:
    indices = np.array([5, 3, 3, 900, 0, 41])
    with FewShotData(synthetic_file) as memory, FewShotData(synthetic_file, in_memory_limit=0) as lazy:
        assert (memory.images(indices) == lazy.images(indices)).all()


def test_small_plan_fixture_file_is_usable(synthetic_file: Path) -> None:
    with FewShotData(synthetic_file) as data:
        assert {str(s) for s in data.stored_shapes("test")} == {str(s) for s in small_plan().shapes}
