from __future__ import annotations

import numpy as np
import pytest
import torch

from fsltool.data.episodes import EpisodeSampler, EpisodeShape, TrainingShape, check_split_fits
from fsltool.errors import FsltoolError


def test_shape_parsing() -> None:
    assert EpisodeShape.parse("5w1s") == EpisodeShape(5, 1, 15)
    assert EpisodeShape.parse("20w5s5q") == EpisodeShape(20, 5, 5)
    assert str(EpisodeShape(5, 1, 15)) == "5w1s15q"
    for bad in ("5way", "0w1s", "5w0s", "5w1s0q", "w1s"):
        with pytest.raises(FsltoolError):
            EpisodeShape.parse(bad)


def test_training_shape_parsing_takes_one_shape_or_a_rising_range_of_shots() -> None:
    assert TrainingShape.parse("20w1-5s2q") == TrainingShape(20, 1, 5, 2)
    assert TrainingShape.parse("5w1s") == TrainingShape(5, 1, 1, 15)
    assert TrainingShape.parse("20w1-5s2q").largest == EpisodeShape(20, 5, 2)
    assert str(TrainingShape(20, 1, 5, 2)) == "20w1-5s2q" and str(TrainingShape(5, 2, 2, 3)) == "5w2s3q"
    for bad in ("5w3-1s", "5w2-2s", "5w0-3s", "1w1-5s", "5w1-5s0q", "5w1-s", "5w-5s"):
        with pytest.raises(FsltoolError, match=repr(bad)):
            TrainingShape.parse(bad)
    with pytest.raises(FsltoolError):
        EpisodeShape.parse("5w1-5s")  # stored and evaluated episodes have one shot


def test_training_shape_draws_every_shot_of_its_range_and_one_shape_draws_nothing() -> None:
    generator = torch.Generator().manual_seed(0)
    shots = [TrainingShape(5, 1, 5, 2).draw(generator).shot for _ in range(2000)]
    counts = np.bincount(shots, minlength=6)[1:]
    assert counts.min() > 0.8 * 400 and counts.max() < 1.2 * 400
    state = generator.get_state()
    assert TrainingShape(5, 3, 3, 2).draw(generator) == EpisodeShape(5, 3, 2)
    assert torch.equal(generator.get_state(), state)


def test_sampler_draws_a_smaller_shape_than_its_own_on_request() -> None:
    sampler = make_sampler([8] * 6, EpisodeShape(5, 5, 2))
    support, query = sampler.sample(EpisodeShape(5, 2, 2))
    assert support.shape == (10,) and query.shape == (10,)


def make_sampler(counts: list[int], shape: EpisodeShape, seed: int = 0) -> EpisodeSampler:
    counts_array = np.array(counts)
    starts = np.concatenate([[0], np.cumsum(counts_array)[:-1]])
    return EpisodeSampler(starts, counts_array, np.arange(len(counts)), shape, torch.Generator().manual_seed(seed))


def test_sampler_draws_distinct_images_of_distinct_classes() -> None:
    counts = [7, 20, 9, 12, 6, 30, 8]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    class_of = np.repeat(np.arange(len(counts)), counts)
    shape = EpisodeShape(4, 2, 4)
    sampler = make_sampler(counts, shape)
    for _ in range(200):
        support, query = sampler.sample()
        both = torch.cat([support, query]).numpy()
        assert len(set(both)) == len(both)  # no image twice
        support_classes = class_of[support.numpy()].reshape(shape.way, shape.shot)
        query_classes = class_of[query.numpy()].reshape(shape.way, shape.query)
        assert (support_classes == support_classes[:, :1]).all()  # ordered class by class
        assert (query_classes == support_classes[:, :1]).all()
        assert len(set(support_classes[:, 0])) == shape.way
        assert (both >= 0).all() and (both < starts[-1] + counts[-1]).all()


def test_sampler_is_uniform_within_a_class() -> None:
    sampler = make_sampler([10, 10], EpisodeShape(2, 1, 1))
    hits = np.zeros(20)
    for _ in range(4000):
        support, query = sampler.sample()
        hits[torch.cat([support, query]).numpy()] += 1
    assert hits.min() > 0.7 * hits.mean() and hits.max() < 1.3 * hits.mean()


def test_sampler_resumes_exactly_from_generator_state() -> None:
    shape = EpisodeShape(3, 1, 2)
    sampler = make_sampler([5] * 8, shape, seed=3)
    for _ in range(5):
        sampler.sample()
    state = sampler.generator.get_state()
    expected = [sampler.sample() for _ in range(5)]
    sampler.generator.set_state(state)
    again = [sampler.sample() for _ in range(5)]
    for (s1, q1), (s2, q2) in zip(expected, again):
        assert torch.equal(s1, s2) and torch.equal(q1, q2)


def test_split_fit_errors_name_class_count_and_shape() -> None:
    names = ["a", "b", "tiny"]
    with pytest.raises(FsltoolError, match=r"class 'tiny' \(test\) has 3 images, fewer than shot \+ query = 6 for 2w1s5q"):
        check_split_fits("test", EpisodeShape(2, 1, 5), names, np.array([10, 10, 3]), np.arange(3))
    with pytest.raises(FsltoolError, match="fewer than the 5 ways"):
        check_split_fits("val", EpisodeShape(5, 1, 1), names, np.array([10, 10, 10]), np.arange(3))
