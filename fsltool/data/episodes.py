"""Episodes: the N-way K-shot task type, its shape, the seeded on-the-fly sampler and stored episode sets."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fsltool.data.transfer import upload
from fsltool.errors import FsltoolError

_SHAPE = re.compile(r"^(\d+)w(\d+)(?:-(\d+))?s(?:(\d+)q)?$")


def _parse_shape(text: str, default_query: int, allow_range: bool) -> tuple[int, int, int, int]:
    """(way, fewest shots, most shots, queries) of ``5w1s``, ``5w1s15q`` or, where allowed, ``20w1-5s2q``."""
    match = _SHAPE.match(str(text).strip())
    if not match or (match[3] is not None and not allow_range):
        forms = "5w1s, 5w1s15q or 20w1-5s2q (a range of shots)" if allow_range else "5w1s or 5w1s15q"
        raise FsltoolError(f"episode shape {text!r} is not of the form {forms}")
    way, fewest = int(match[1]), int(match[2])
    most = int(match[3]) if match[3] is not None else fewest
    query = int(match[4]) if match[4] is not None else default_query
    if match[3] is not None and most <= fewest:
        raise FsltoolError(f"episode shape {text!r}: the range of shots must rise, e.g. 1-5")
    if way < 2 or fewest < 1 or query < 1:
        raise FsltoolError(f"episode shape {text!r}: way must be >= 2, shot and query >= 1")
    return way, fewest, most, query


@dataclass(frozen=True)
class EpisodeShape:
    """N-way K-shot with Q queries per class; written ``5w1s15q`` (``5w1s`` takes the default Q)."""

    way: int
    shot: int
    query: int

    @classmethod
    def parse(cls, text: str, default_query: int = 15) -> EpisodeShape:
        way, shot, _, query = _parse_shape(text, default_query, allow_range=False)
        return cls(way, shot, query)

    @property
    def per_class(self) -> int:
        return self.shot + self.query

    def __str__(self) -> str:
        return f"{self.way}w{self.shot}s{self.query}q"


@dataclass(frozen=True)
class TrainingShape:
    """Training episodes: ``5w1s15q`` (one shape), or ``20w1-5s2q``: N-way with Q queries per class and a shot drawn
    uniformly from 1 to 5 for every meta-batch, as SNAIL trains one model per way for every shot. A whole
    meta-batch shares its shot, so its episodes stack (grouped MAML steps, one BatchNorm pass over the meta-batch)."""

    way: int
    fewest_shots: int
    most_shots: int
    query: int

    @classmethod
    def parse(cls, text: str, default_query: int = 15) -> TrainingShape:
        return cls(*_parse_shape(text, default_query, allow_range=True))

    @property
    def largest(self) -> EpisodeShape:
        """The episodes with the most images per class: what every class of the split must supply."""
        return EpisodeShape(self.way, self.most_shots, self.query)

    def draw(self, generator: torch.Generator) -> EpisodeShape:
        """The next meta-batch's shape; one shape draws nothing, so fixed-shape runs keep their episodes."""
        if self.fewest_shots == self.most_shots:
            return self.largest
        shot = int(torch.randint(self.fewest_shots, self.most_shots + 1, (1,), generator=generator))
        return EpisodeShape(self.way, shot, self.query)

    def __str__(self) -> str:
        shots = f"{self.fewest_shots}-{self.most_shots}" if self.fewest_shots != self.most_shots else str(self.most_shots)
        return f"{self.way}w{shots}s{self.query}q"


@dataclass
class Episode:
    """One task. Support and query are ordered class by class, so labels are ``arange(way)`` repeated."""

    support: torch.Tensor  # (way*shot, C, H, W) float in [0, 1]
    support_labels: torch.Tensor  # (way*shot,) int64
    query: torch.Tensor  # (way*query, C, H, W)
    query_labels: torch.Tensor  # (way*query,) int64
    shape: EpisodeShape

    def to(self, device: torch.device) -> Episode:
        """The episode on ``device`` (itself where it already is there), moved as fsltool.data.transfer.upload moves."""
        if self.support.device == device:
            return self
        return Episode(*(upload(t, device) for t in (self.support, self.support_labels, self.query, self.query_labels)), self.shape)


def stack_episodes(episodes: Sequence[Episode]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(support, support labels, query, query labels), each stacked over ``episodes`` of one shape."""
    return tuple(torch.stack([getattr(e, key) for e in episodes]) for key in ("support", "support_labels", "query", "query_labels"))  # type: ignore[return-value]


def episode_labels(shape: EpisodeShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query labels of an episode laid out class by class."""
    classes = torch.arange(shape.way)
    return classes.repeat_interleave(shape.shot), classes.repeat_interleave(shape.query)


class EpisodeSampler:
    """Draws episode image indices from a split's classes, seeded by a torch.Generator.

    Vectorised: one random key per (class, image) slot, masked past each class's count, then a top-k
    gives a uniform draw without replacement for every class at once (no Python loop per class).
    The generator's state is the sampler's whole state, so a checkpoint can resume it exactly.
    """

    def __init__(
        self,
        class_start: np.ndarray,
        class_count: np.ndarray,
        classes: np.ndarray,
        shape: EpisodeShape,
        generator: torch.Generator,
    ) -> None:
        self.shape = shape
        self.generator = generator
        self._classes = torch.as_tensor(classes, dtype=torch.long)
        self._start = torch.as_tensor(class_start, dtype=torch.long)[self._classes]
        self._count = torch.as_tensor(class_count, dtype=torch.long)[self._classes]
        self._max_count = int(self._count.max()) if len(self._count) else 0

    def sample(self, shape: EpisodeShape | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (support indices, query indices) into the image array, ordered class by class: an episode of the
        sampler's shape, or of ``shape`` (no more ways or images per class than the sampler's shape, which the split
        was checked for)."""
        shape = shape or self.shape
        chosen = torch.randperm(len(self._classes), generator=self.generator)[: shape.way]
        keys = torch.rand(shape.way, self._max_count, generator=self.generator)
        keys[torch.arange(self._max_count) >= self._count[chosen, None]] = 2.0
        picks = keys.topk(shape.per_class, dim=1, largest=False, sorted=True).indices
        indices = self._start[chosen, None] + picks
        return indices[:, : shape.shot].reshape(-1), indices[:, shape.shot :].reshape(-1)


def check_split_fits(
    split: str, shape: EpisodeShape, class_names: list[str], class_count: np.ndarray, classes: np.ndarray
) -> None:
    """Refuse a shape a split cannot supply, naming the class, its image count and the shape."""
    if len(classes) < shape.way:
        raise FsltoolError(f"split {split!r} has {len(classes)} classes, fewer than the {shape.way} ways of {shape}")
    counts = class_count[classes]
    small = np.flatnonzero(counts < shape.per_class)
    if len(small):
        first = int(classes[small[0]])
        raise FsltoolError(
            f"class {class_names[first]!r} ({split}) has {int(counts[small[0]])} images, fewer than "
            f"shot + query = {shape.per_class} for {shape}"
            + (f" ({len(small)} such classes)" if len(small) > 1 else "")
        )


def draw_episodes(sampler: EpisodeSampler, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` episodes as index arrays (count, way*shot) and (count, way*query) for storing."""
    support, query = zip(*(sampler.sample() for _ in range(count)))
    return torch.stack(support).numpy().astype(np.int32), torch.stack(query).numpy().astype(np.int32)
