from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import EvalResult, episode_accuracies, evaluate


def test_confidence_interval_is_1_96_std_over_sqrt_n() -> None:
    accuracies = np.array([0.8, 1.0, 0.9, 0.7, 1.0, 0.6])
    result = EvalResult("test", EpisodeShape(5, 1, 15), accuracies, "stored")
    assert result.accuracy == pytest.approx(83.3333, abs=1e-3)
    assert result.ci95 == pytest.approx(1.96 * accuracies.std(ddof=1) / math.sqrt(6) * 100)
    payload = result.to_json()
    assert {"accuracy", "ci95", "episodes", "way", "shot", "query"} <= payload.keys() and payload["episodes"] == 6


def test_embedding_once_per_image_matches_episode_by_episode(trained_run: Path, synthetic_file: Path) -> None:
    method = load_trained(trained_run).method
    shape = EpisodeShape(5, 5, 5)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        fast = episode_accuracies(method, data, shape, support, query)
        slow = []
        for s, q in zip(support, query):
            episode = data.episode(s, q, shape)
            with torch.inference_mode():
                scores = method(episode.support, episode.support_labels, episode.query)
            slow.append((scores.argmax(-1) == episode.query_labels).float().mean().item())
    np.testing.assert_allclose(fast, slow)
    assert len(fast) == 30


def test_stored_subset_and_sampled_episodes(trained_run: Path, synthetic_file: Path) -> None:
    method = load_trained(trained_run).method
    shape = EpisodeShape(5, 1, 5)
    with FewShotData(synthetic_file) as data:
        assert len(evaluate(method, data, "test", shape, episodes=7).accuracies) == 7
        a = evaluate(method, data, "test", EpisodeShape(3, 2, 3), episodes=12, sample_seed=4)
        b = evaluate(method, data, "test", EpisodeShape(3, 2, 3), episodes=12, sample_seed=4)
        np.testing.assert_array_equal(a.accuracies, b.accuracies)
        assert a.episodes_from == "sampled (seed 4)"
        with pytest.raises(FsltoolError, match=r"no stored test episodes of shape 20w1s15q \(stored: 5w1s5q, 5w5s5q\)"):
            evaluate(method, data, "test", EpisodeShape(20, 1, 15))
        with pytest.raises(FsltoolError, match="unknown split 'tset'"):
            evaluate(method, data, "tset", shape, sample_seed=1)


def test_frozen_inference_copy_matches_eager_embeddings(trained_run: Path, synthetic_file: Path) -> None:
    from fsltool.evaluate import embed_all

    method = load_trained(trained_run).method
    indices = np.arange(0, 300, 7)
    with FewShotData(synthetic_file) as data:
        frozen = embed_all(method, data, indices)
        eager = embed_all(method, data, indices, frozen=False)
    assert frozen.shape == eager.shape == (len(indices), 64)
    torch.testing.assert_close(frozen, eager, rtol=1e-4, atol=1e-4)
