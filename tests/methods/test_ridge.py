"""MetaOptNet-RR's ridge-regression head: the closed-form dual equals the primal ridge regression (and MetaOptNet's
QP), gradients reach the backbone and the scale, a short meta-training run learns, and export is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    assert_learned_scale_and_backbone_train,
    assert_short_run_learns_evaluates_once_and_is_not_exported,
    quick_recipe,
    trained,
)

from fsltool.errors import FsltoolError
from fsltool.methods import build_method
from fsltool.methods.ridge import RidgeRegression, ridge_scores
from fsltool.models import build_backbone


def method(**options: object) -> RidgeRegression:
    torch.manual_seed(0)
    built = build_method("ridge", build_backbone("conv4", 1, [0.1], [0.3], hidden=8), options)
    assert isinstance(built, RidgeRegression)
    return built


@pytest.mark.parametrize(("way", "shot", "dim"), [(5, 1, 64), (5, 5, 16), (3, 4, 200)])
def test_the_dual_solution_is_the_primal_ridge_regression(way: int, shot: int, dim: int) -> None:
    """W minimising |X W^T - 2Y|^2 + lambda |W|^2 (primal, a D x D system), and MetaOptNet's QP optimum a with
    (K + lambda I) a = 2Y: the same scores, with fewer features than images (16 < 25) and more (200)."""
    generator = torch.Generator().manual_seed(way * 10 + shot)
    support = torch.randn(2, way * shot, dim, generator=generator, dtype=torch.float64)
    query = torch.randn(2, 7, dim, generator=generator, dtype=torch.float64)
    labels = torch.arange(way).repeat_interleave(shot).expand(2, -1)
    targets = 2 * torch.nn.functional.one_hot(labels, way).double()
    penalty = 50.0
    primal = torch.linalg.solve(support.transpose(1, 2) @ support + penalty * torch.eye(dim, dtype=torch.float64),
                                support.transpose(1, 2) @ targets)  # (E, D, way)
    torch.testing.assert_close(ridge_scores(support, labels, query, way, penalty).double(), query @ primal, rtol=1e-4, atol=1e-4)


def test_a_bf16_recipe_leaves_the_solve_in_full_precision() -> None:
    """Under bf16 autocast (``precision: bf16``) the regression is solved in float32: the scores are the same."""
    generator = torch.Generator().manual_seed(6)
    support, query = torch.randn(1, 10, 64, generator=generator), torch.randn(1, 6, 64, generator=generator)
    labels = torch.arange(5).repeat_interleave(2)[None]
    expected = ridge_scores(support, labels, query, 5, 50.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ridge_scores(support, labels, query, 5, 50.0), expected, rtol=0, atol=0)


def test_gradients_reach_the_backbone_and_the_scale() -> None:
    assert_learned_scale_and_backbone_train(method)


def test_many_episodes_at_once_equal_one_at_a_time() -> None:
    generator = torch.Generator().manual_seed(2)
    support, query = torch.randn(3, 10, 32, generator=generator), torch.randn(3, 6, 32, generator=generator)
    labels = torch.arange(5).repeat_interleave(2).expand(3, -1)
    net = method()
    with torch.no_grad():
        together = net.scores_from_embeddings(support, labels, query, 5)
        alone = torch.cat([net.scores_from_embeddings(support[i : i + 1], labels[i : i + 1], query[i : i + 1], 5) for i in range(3)])
    torch.testing.assert_close(together, alone)


def test_short_meta_training_learns_and_evaluates_embedding_once(synthetic_file: Path, tmp_path: Path) -> None:
    run = trained(quick_recipe(synthetic_file, tmp_path / "run", method="ridge", shape="5w1s5q", episodes=40, log_every=10))
    assert_short_run_learns_evaluates_once_and_is_not_exported(run, synthetic_file, tmp_path / "export", "cannot be exported: its scores solve a linear system per episode")


@pytest.mark.parametrize(("options", "message"), [
    ({"penalty": 0}, "method_options.penalty must be a positive number, got 0"),
    ({"scale": -1.0}, "method_options.scale must be a positive number"),
    ({"learn_scale": "yes"}, "method_options.learn_scale must be true or false"),
])
def test_bad_options_name_the_key(options: dict, message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        method(**options)
