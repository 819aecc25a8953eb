"""Evaluation of the methods that adapt per episode (MAML, Reptile) scores several episodes side by side (one
grouped network for a chain backbone, per-task passes for a residual one): the scores must be those of each
episode adapted alone."""

from __future__ import annotations

import pytest
import torch

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
