"""Meta-batches drawn for a range of shots: one shape per meta-batch, the same with or without prefetching, and
resumed exactly from the sampler state a checkpoint stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fsltool.data.batches import MetaBatches
from fsltool.data.episodes import Episode, TrainingShape
from fsltool.data.store import FewShotData

SHAPES = TrainingShape(5, 1, 4, 2)


@pytest.fixture
def data(synthetic_file: Path) -> Iterator[FewShotData]:
    with FewShotData(synthetic_file) as opened:
        yield opened


def meta_batches(data: FewShotData, count: int, *, prefetch: bool = False, state: torch.Tensor | None = None) -> MetaBatches:
    generator = torch.Generator().manual_seed(5)
    if state is not None:
        generator.set_state(state)
    return MetaBatches(data, data.sampler("train", SHAPES.largest, generator), 3, range(3), count, prefetch=prefetch, shapes=SHAPES)


def drawn(batches: MetaBatches, count: int) -> list[list[Episode]]:
    try:
        return [batches.next() for _ in range(count)]
    finally:
        batches.close()


def test_every_meta_batch_shares_one_drawn_shot_and_the_shots_vary(data: FewShotData) -> None:
    batches = drawn(meta_batches(data, 24), 24)
    shots = []
    for batch in batches:
        assert len({episode.shape for episode in batch}) == 1
        shape = batch[0].shape
        assert batch[0].support.shape[0] == shape.way * shape.shot and batch[0].query.shape[0] == shape.way * 2
        shots.append(shape.shot)
    assert set(shots) == {1, 2, 3, 4}


def test_prefetching_and_resuming_draw_the_same_meta_batches(data: FewShotData) -> None:
    straight = drawn(meta_batches(data, 10), 10)
    prefetched = meta_batches(data, 10, prefetch=True)
    first = [prefetched.next() for _ in range(4)]
    state = prefetched.sampler_state()
    prefetched.close()
    resumed = first + drawn(meta_batches(data, 6, prefetch=True, state=state), 6)
    for expected, got in zip(straight, resumed, strict=True):
        for a, b in zip(expected, got, strict=True):
            assert a.shape == b.shape and torch.equal(a.support, b.support) and torch.equal(a.query, b.query)
