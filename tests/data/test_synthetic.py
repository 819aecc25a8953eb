"""The procedural glyph source: reproducible bytes, sound splits, and a genuine few-shot problem."""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter

import numpy as np
import pytest

from fsltool.data.sources.base import SPLITS, SourceListing
from fsltool.data.sources.synthetic import synthetic
from fsltool.errors import FsltoolError


def images(listing: SourceListing) -> np.ndarray:
    """All images of a listing as float (classes, instances, pixels)."""
    return np.stack([[listing.load(item).ravel() for item in spec.items] for spec in listing.classes]).astype(float)


def test_listing_names_items_shape_and_provenance() -> None:
    listing = synthetic(classes=12, images_per_class=3, size=20, seed=5, jitter=0.5)
    assert [spec.name for spec in listing.classes] == [f"glyph{c:04d}" for c in range(12)]
    assert [spec.items for spec in listing.classes][3] == ((3, 0), (3, 1), (3, 2))
    assert listing.image_shape == (1, 20, 20)
    assert listing.describe((3, 2)) == "synthetic:glyph0003#02"
    assert listing.provenance == {
        "source": "synthetic",
        "version": 1,
        "classes": 12,
        "images_per_class": 3,
        "size": 20,
        "seed": 5,
        "split_ratios": [0.6, 0.2, 0.2],
        "jitter": 0.5,
        "colour": False,
    }
    assert synthetic(classes=10001, images_per_class=1).classes[-1].name == "glyph10000"  # nothing renders
    assert synthetic(classes=3, images_per_class=120).describe((2, 5)) == "synthetic:glyph0002#005"


@pytest.mark.parametrize("size", [8, 28, 37])
def test_images_are_bright_ink_on_black_uint8(size: int) -> None:
    listing = synthetic(classes=3, images_per_class=2, size=size)
    for spec in listing.classes:
        for item in spec.items:
            image = listing.load(item)
            assert image.shape == (1, size, size) and image.dtype == np.uint8
            assert image.max() > 127  # bright ink (strokes are at least a pixel wide, even at size 8)
            assert np.median(image) == 0  # on a black background
            assert 0 < (image > 127).mean() < 0.5


def test_same_seed_same_bytes_in_any_order_and_after_pickling() -> None:
    first = synthetic(classes=6, images_per_class=4, seed=3)
    second = synthetic(classes=6, images_per_class=4, seed=3)
    items = [item for spec in first.classes for item in spec.items]
    forward = [first.load(item) for item in items]
    loader = pickle.loads(pickle.dumps(second.load))  # the packer may load in worker processes
    backward = [loader(item) for item in reversed(items)][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(forward, backward))
    assert [spec.split for spec in first.classes] == [spec.split for spec in second.classes]


def test_bytes_are_pinned() -> None:
    """A change here means every packed synthetic file changes: bump _VERSION in synthetic.py and re-pin."""
    listing = synthetic(classes=4, images_per_class=3, seed=7, jitter=1.0)
    digest = hashlib.sha256()
    for spec in listing.classes:
        for item in spec.items:
            digest.update(listing.load(item).tobytes())
    assert digest.hexdigest() == "ceb96319faa4f09b8d6f1e55e0d356881177a394b6751a8091a4835e23af7db4"
    assert [spec.split for spec in listing.classes] == ["train", "train", "test", "val"]


def test_different_seed_different_glyphs_and_splits() -> None:
    a = synthetic(classes=30, images_per_class=1, seed=0)
    b = synthetic(classes=30, images_per_class=1, seed=1)
    assert not any(np.array_equal(a.load((c, 0)), b.load((c, 0))) for c in range(5))
    assert [spec.split for spec in a.classes] != [spec.split for spec in b.classes]


@pytest.mark.parametrize(
    ("classes", "ratios", "expected"),
    [
        (10, (0.6, 0.2, 0.2), (6, 2, 2)),
        (1200, (0.6, 0.2, 0.2), (720, 240, 240)),
        (7, (0.5, 0.25, 0.25), (3, 2, 2)),  # leftover classes go to the largest remainders...
        (6, (0.5, 0.25, 0.25), (3, 2, 1)),  # ...ties to the earlier split
        (3, (0.6, 0.2, 0.2), (1, 1, 1)),  # every split gets a class...
        (4, (0.98, 0.01, 0.01), (2, 1, 1)),  # ...however small its ratio
    ],
)
def test_split_counts(classes: int, ratios: tuple[float, float, float], expected: tuple[int, int, int]) -> None:
    listing = synthetic(classes=classes, images_per_class=1, split_ratios=ratios)
    counts = Counter(spec.split for spec in listing.classes)
    assert tuple(counts[split] for split in SPLITS) == expected
    assert len({spec.name for spec in listing.classes}) == classes  # each class listed once, in one split


def test_splits_are_a_permutation_not_a_range() -> None:
    splits = [spec.split for spec in synthetic(classes=30, images_per_class=1).classes]
    assert splits != sorted(splits, key=SPLITS.index)


def test_instances_vary_but_stay_closest_to_their_own_class() -> None:
    data = images(synthetic(classes=12, images_per_class=6, seed=2))
    within, between = [], []
    for c in range(len(data)):
        for i in range(6):
            for j in range(i + 1, 6):
                assert not np.array_equal(data[c, i], data[c, j])  # jitter is real
                within.append(np.linalg.norm(data[c, i] - data[c, j]))
            others = np.delete(data, c, axis=0).reshape(-1, data.shape[-1])
            between.extend(np.linalg.norm(others - data[c, i], axis=1))
    assert np.mean(within) < 0.9 * np.mean(between)


def test_jitter_sets_the_difficulty() -> None:
    still = images(synthetic(classes=3, images_per_class=3, jitter=0.0))
    assert (still == still[:, :1]).all()  # no jitter: every instance is the class's character
    spread = [
        np.mean([np.linalg.norm(d[c, 0] - d[c, 1]) for c in range(len(d))])
        for d in (images(synthetic(classes=8, images_per_class=2, jitter=j)) for j in (0.5, 1.0, 2.0))
    ]
    assert spread[0] < spread[1] < spread[2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"classes": 2}, r"--classes must be at least 3 \(one per split\), got 2"),
        ({"images_per_class": 0}, "--images-per-class must be at least 1, got 0"),
        ({"size": 7}, "--size must be at least 8, got 7"),
        ({"seed": -1}, "--seed must be a non-negative integer, got -1"),
        ({"jitter": -0.1}, "--jitter must be at least 0, got -0.1"),
        ({"jitter": float("nan")}, "--jitter must be at least 0, got nan"),
    ],
)
def test_bad_options_are_refused_naming_option_and_value(options: dict, message: str) -> None:
    with pytest.raises(FsltoolError, match=rf"^synthetic: {message}") as error:
        synthetic(**options)
    assert "\n" not in str(error.value)


def one_shot_accuracy(data: np.ndarray, episodes: int, seed: int) -> float:
    """5-way 1-shot accuracy of nearest neighbour on raw pixels: how hard the problem is without learning."""
    rng = np.random.default_rng(seed)
    correct = 0
    for _ in range(episodes):
        classes = rng.choice(len(data), 5, replace=False)
        picks = np.stack([rng.choice(data.shape[1], 2, replace=False) for _ in classes])
        support, query = data[classes, picks[:, 0]], data[classes, picks[:, 1]]
        distances = ((query[:, None] - support[None]) ** 2).sum(-1)
        correct += int((distances.argmin(1) == np.arange(5)).sum())
    return correct / (5 * episodes)


def test_one_shot_is_hard_without_learning_and_trivial_without_jitter() -> None:
    assert 0.4 < one_shot_accuracy(images(synthetic(classes=40, images_per_class=5)), 400, 0) < 0.85
    assert one_shot_accuracy(images(synthetic(classes=10, images_per_class=2, jitter=0.0)), 50, 0) == 1.0


def test_colour_images_are_rgb_glyphs_in_class_ink_on_varied_backgrounds() -> None:
    """--colour: (3, H, W) uint8, the grey set's glyph shapes, reproducible in any order; a class's ink is closer
    to its own instances' ink than the backgrounds are to each other, so colour is a cue
    of the class."""
    grey = synthetic(classes=6, images_per_class=4, size=32, seed=3)
    colour = synthetic(classes=6, images_per_class=4, size=32, seed=3, colour=True)
    assert colour.image_shape == (3, 32, 32) and colour.provenance["colour"] is True
    items = [item for spec in colour.classes for item in spec.items]
    images = [colour.load(item) for item in items]
    again = pickle.loads(pickle.dumps(colour.load))
    assert all(np.array_equal(a, again(item)) for a, item in zip(images[::-1], items[::-1]))
    assert all(image.shape == (3, 32, 32) and image.dtype == np.uint8 for image in images)
    masks = [grey.load(item)[0] > 200 for item in items]
    inks = np.array([image[:, mask].mean(1) for image, mask in zip(images, masks)])
    within = np.mean([np.abs(inks[c * 4] - inks[c * 4 + i]).mean() for c in range(6) for i in range(1, 4)])
    between = np.mean([np.abs(inks[a * 4] - inks[b * 4]).mean() for a in range(6) for b in range(6) if a != b])
    assert within < between
    assert not np.array_equal(images[0], images[1])  # instances differ
