"""Evaluation of the methods that adapt per episode (MAML, Reptile) scores several episodes side by side (one
grouped network for a chain backbone, per-task passes for a residual one): the scores must be those of each
episode adapted alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fsltool.data.episodes import EpisodeShape, episode_labels
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import episode_scores, evaluate
from fsltool.methods import build_method
from fsltool.methods.adaptation import AdaptiveMethod
from fsltool.models import build_backbone
from fsltool.models.backbones import Backbone
from tests.methods.test_adaptation_functional import residual_backbone

CASES = [
    ("maml", {"test_inner_steps": 2}),
    ("maml", {"test_inner_steps": 2, "transductive_bn": True}),
    ("maml", {"test_inner_steps": 2, "first_order": True}),
    ("reptile", {"test_inner_steps": 4, "test_inner_batch": 3}),
    ("reptile", {"test_inner_steps": 4, "test_inner_batch": 3, "per_query_bn": True}),
    ("reptile", {"test_inner_steps": 4, "test_inner_batch": 3, "transductive_bn": True}),
]


def episodes(count: int, way: int, shot: int, query: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` random episodes stacked: (E, way*shot, 1, 28, 28), (E, way*shot), (E, way*query, 1, 28, 28)."""
    generator = torch.Generator().manual_seed(3)
    support = torch.rand(count, way * shot, 1, 28, 28, generator=generator)
    labels = torch.arange(way).repeat_interleave(shot).expand(count, -1)
    return support, labels, torch.rand(count, way * query, 1, 28, 28, generator=generator)


def backbone(kind: str) -> Backbone:
    torch.manual_seed(0)
    return build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=8) if kind == "chain" else residual_backbone(width=8)


@pytest.mark.parametrize("kind", ["chain", "residual"])
@pytest.mark.parametrize(("name", "options"), CASES)
def test_episodes_scored_together_equal_each_scored_alone(name: str, options: dict[str, object], kind: str) -> None:
    method = build_method(name, backbone(kind), {"way": 3, **options})
    assert isinstance(method, AdaptiveMethod)
    with torch.no_grad():
        method.head.weight.normal_(0, 0.3)  # a head that already separates classes, so the scores differ by episode
    method.eval()
    method.images_per_pass = 80  # episodes of 36 images: passes of 2, 2 and 1 episodes
    # per-query BatchNorm: 30 queries of 7 images (support + itself) per episode, 11 queries per pass of 80 images
    support, labels, query = episodes(5, way=3, shot=2, query=10)
    with torch.no_grad():
        together = method.score_episodes(support, labels, query)
        alone = torch.stack([method(s, l, q) for s, l, q in zip(support, labels, query)])
    assert together.shape == (5, 30, 3)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0], together[1])  # different episodes, different scores
    assert method.episodes_per_call > 1  # evaluation hands it several episodes per call


def test_worker_processes_score_as_one_process(synthetic_file: Path) -> None:
    """evaluate(workers=3): three one-thread processes (two spawned) score contiguous parts of the episodes; the
    scores are those of one process (each episode's inner loop is seeded on its own), in order; refused where the
    method embeds each image once."""
    method = build_method("reptile", backbone("chain"), {"way": 5, "test_inner_steps": 3, "test_inner_batch": 5, "per_query_bn": True})
    with torch.no_grad():
        method.head.weight.normal_(0, 0.3)
    shape = EpisodeShape(5, 1, 5)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        one = episode_scores(method, data, shape, support[:7], query[:7])
        three = episode_scores(method, data, shape, support[:7], query[:7], workers=3)
        assert method.training  # left as it was
        torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(three[0], three[6])
        result = evaluate(method, data, "test", shape, episodes=7, workers=2)
        assert result.accuracies.tolist() == (one.argmax(-1) == episode_labels(shape)[1]).float().mean(-1).tolist()
        protonet = build_method("protonet", backbone("chain"), {})
        with pytest.raises(FsltoolError, match="--workers splits the episodes of methods that adapt to each one"):
            evaluate(protonet, data, "test", shape, episodes=2, workers=2)
