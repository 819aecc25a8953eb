"""MetaOptNet-SVM's head and its interior-point solver: qpth's iterates (values from qpth 0.0.18), the optimum of
the Crammer-Singer dual (against projected gradient descent), implicit gradients (against finite differences),
batched = one episode at a time, and the method: training vs evaluation iterations, gradients, a short run, export
refused, bad options."""

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

from fsltool.data.episodes import Episode, EpisodeShape
from fsltool.errors import FsltoolError
from fsltool.methods import build_method
from fsltool.methods.qp import solve_qp
from fsltool.methods.svm import MultiClassSVM, svm_dual
from fsltool.models import build_backbone

GOLDEN_FEATURES = torch.tensor([[0.5, -1.0, 0.25], [0.75, -0.5, 0.0], [-1.0, 0.5, 0.5], [-0.5, 1.0, 0.25],
                                [0.0, 0.25, -1.0], [0.25, 0.0, -0.75]], dtype=torch.float64)
# qpth 0.0.18's QPFunction(maxIter=k) on MetaOptNet's SVM-CS problem of GOLDEN_FEATURES (3-way 2-shot, C 0.1, the
# 1.0 ridge), float64: the dual coefficients of the first and third support images (scripts/check_svm_against_qpth.py
# compares whole episodes).
QPTH_ITERATES = {
    1: [0.14284610849, -0.030708204307, -0.112137904182, -0.040247660024, 0.122059431123, -0.081811771099],
    2: [0.115260632996, -0.039528879846, -0.075731753151, -0.044528643487, 0.10841549163, -0.063886848143],
    3: [0.094172554303, -0.033575809039, -0.060596745264, -0.038501201184, 0.091594404704, -0.05309320352],
}


def method(**options: object) -> MultiClassSVM:
    torch.manual_seed(0)
    built = build_method("svm", build_backbone("conv4", 1, [0.1], [0.3], hidden=8), options)
    assert isinstance(built, MultiClassSVM)
    return built


def golden_dual(iterations: int) -> torch.Tensor:
    labels = torch.arange(3).repeat_interleave(2)
    return svm_dual(GOLDEN_FEATURES[None], labels[None], 3, 0.1, 1.0, iterations)[0]


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_the_iterates_are_qpths(iterations: int) -> None:
    alpha = golden_dual(iterations)
    got = torch.cat([alpha[0], alpha[2]])
    torch.testing.assert_close(got, torch.tensor(QPTH_ITERATES[iterations], dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("way", "shot", "dim"), [(3, 2, 3), (5, 1, 8), (4, 3, 6), (5, 5, 64)])
def test_enough_iterations_reach_the_optimum_of_the_dual(way: int, shot: int, dim: int) -> None:
    """The returned coefficients satisfy the dual's optimality conditions, checked from their definition: feasible
    (alpha <= C y, each image's coefficients summing to 0), and for each image the objective's gradient is largest,
    and equal, on every coefficient below its bound (the equality multiplier), no larger on those at it."""
    generator = torch.Generator().manual_seed(way + shot + dim)
    features = torch.randn(way * shot, dim, generator=generator, dtype=torch.float64)
    labels = torch.arange(way).repeat_interleave(shot)
    onehot = torch.nn.functional.one_hot(labels, way).double()
    alpha = svm_dual(features[None], labels[None], way, 0.1, 1.0, 40)[0]
    assert (alpha <= 0.1 * onehot + 1e-9).all()
    torch.testing.assert_close(alpha.sum(1), torch.zeros(way * shot, dtype=torch.float64), rtol=0, atol=1e-9)
    gradient = features @ features.T @ alpha + alpha - onehot  # of 1/2 |sum_i alpha_i x_i|^2 + 1/2 |alpha|^2 - y . alpha
    below_bound = alpha < 0.1 * onehot - 1e-7
    top = gradient.amax(1, keepdim=True)
    assert below_bound.any(1).all()
    torch.testing.assert_close(torch.where(below_bound, gradient, top), top.expand_as(gradient), rtol=0, atol=1e-7)


def test_gradients_are_the_implicit_derivative_of_the_optimum() -> None:
    """At convergence (float64), the gradient of a loss of the dual coefficients with respect to the support features
    matches central finite differences: the backward pass differentiates the optimum, through the Gram matrix."""
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(1, 6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(3).repeat_interleave(2)[None]
    weights = torch.randn(1, 6, 3, generator=generator, dtype=torch.float64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (svm_dual(x, labels, 3, 0.1, 1.0, 40) * weights).sum()

    (gradient,) = torch.autograd.grad(loss(features), features)
    numeric = torch.zeros_like(features)
    with torch.no_grad():
        for index in range(features.numel()):
            step = torch.zeros_like(features).view(-1)
            step[index] = 1e-6
            numeric.view(-1)[index] = (loss(features + step.view_as(features)) - loss(features - step.view_as(features))) / 2e-6
    torch.testing.assert_close(gradient, numeric, rtol=1e-4, atol=1e-6)


def test_each_problem_of_a_batch_is_solved_as_alone() -> None:
    """Stopping and step lengths are per problem: a batch gives each episode what solving it alone gives, at every
    iteration count (qpth stops a batch as one)."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(4, 10, 16, generator=generator, dtype=torch.float64) * torch.tensor([0.1, 1, 3, 10]).view(4, 1, 1)
    labels = torch.arange(5).repeat_interleave(2).expand(4, -1)
    for iterations in (2, 3, 15):
        together = svm_dual(features, labels, 5, 0.1, 1.0, iterations)
        alone = torch.cat([svm_dual(features[i : i + 1], labels[i : i + 1], 5, 0.1, 1.0, iterations) for i in range(4)])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


def test_the_solver_returns_the_best_iterate_it_compared() -> None:
    """More iterations never give a larger residual: the returned point is the best of those compared, and at 15
    iterations the problem is solved to float64 precision."""
    hessian = torch.tensor([[[2.0, 0.5], [0.5, 1.0]]], dtype=torch.float64)
    linear = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    upper = torch.tensor([[0.2, 10.0]], dtype=torch.float64)
    none = torch.zeros(1, 0, 2, dtype=torch.float64)
    solutions = [solve_qp(hessian, linear, upper, none, torch.zeros(1, 0, dtype=torch.float64), k).z for k in (1, 3, 15)]
    # the optimum: z1 at its bound 0.2, z2 = (1 - 0.5 * 0.2) / 1.0 = 0.9
    torch.testing.assert_close(solutions[-1], torch.tensor([[0.2, 0.9]], dtype=torch.float64), rtol=0, atol=1e-9)
    errors = [(z - solutions[-1]).abs().max().item() for z in solutions]
    assert errors[0] >= errors[1] >= errors[2]


def test_training_and_evaluation_use_their_own_iteration_counts() -> None:
    net = method(iterations=15, evaluation_iterations=3, double_precision=True)
    generator = torch.Generator().manual_seed(4)
    support, query = torch.randn(1, 10, 16, generator=generator), torch.randn(1, 6, 16, generator=generator)
    labels = torch.arange(5).repeat_interleave(2)[None]

    def expected(iterations: int) -> torch.Tensor:
        alpha = svm_dual(support.double(), labels, 5, 0.1, 1.0, iterations)
        return ((query.double() @ support.double().transpose(1, 2)) @ alpha).float()

    with torch.no_grad():
        torch.testing.assert_close(net.train().scores_from_embeddings(support, labels, query, 5), expected(15))
        torch.testing.assert_close(net.eval().scores_from_embeddings(support, labels, query, 5), expected(3))
    assert not torch.allclose(expected(3), expected(15), atol=1e-4)


def test_a_bf16_recipe_leaves_the_solve_in_full_precision() -> None:
    """Under bf16 autocast (``precision: bf16``) the Gram matrix and the interior-point iteration stay in the solve's
    dtype: the same scores, and the same feature gradients from the backward pass the training loop takes after the
    autocast region, as without autocast."""
    net = method()
    generator = torch.Generator().manual_seed(6)
    support, query = torch.randn(1, 10, 64, generator=generator), torch.randn(1, 6, 64, generator=generator)
    labels = torch.arange(5).repeat_interleave(2)[None]
    results = []
    for bf16 in (False, True):
        features = support.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            scores = net.train().scores_from_embeddings(features, labels, query, 5)
        (gradient,) = torch.autograd.grad(scores.square().sum(), features)
        results.append((scores, gradient))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_gradients_reach_the_backbone_and_the_scale() -> None:
    assert_learned_scale_and_backbone_train(method)


def test_a_meta_batch_is_one_solve_equal_to_episode_by_episode() -> None:
    net = method(double_precision=True)
    episodes = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        episodes.append(Episode(torch.rand(10, 1, 28, 28, generator=generator), torch.arange(5).repeat_interleave(2),
                                torch.rand(10, 1, 28, 28, generator=generator), torch.arange(5).repeat_interleave(2),
                                EpisodeShape(5, 2, 2)))
    with torch.no_grad():
        together = net.meta_step(episodes)
        alone = [net.step(episode) for episode in episodes]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)


def test_short_meta_training_learns_and_evaluates_embedding_once(synthetic_file: Path, tmp_path: Path) -> None:
    # float64 solves: in float32 the paths' embeddings differ by rounding (batch sizes), which the ill-conditioned
    # late iterations amplify beyond the helper's 1e-5 (the same solve on the same numbers agrees: the batch test)
    recipe = quick_recipe(synthetic_file, tmp_path / "run", method="svm", method_options={"double_precision": True},
                          shape="5w1s5q", episodes=40, log_every=10)
    run = trained(recipe)
    assert_short_run_learns_evaluates_once_and_is_not_exported(run, synthetic_file, tmp_path / "export", "cannot be exported: its scores solve a quadratic program per episode")


@pytest.mark.parametrize(("options", "message"), [
    ({"cost": 0}, "method_options.cost must be a positive number, got 0"),
    ({"ridge": -1.0}, "method_options.ridge must be a positive number"),
    ({"iterations": 0}, "method_options.iterations must be a positive integer, got 0"),
    ({"evaluation_iterations": 2.5}, "method_options.evaluation_iterations must be a positive integer"),
    ({"double_precision": "no"}, "method_options.double_precision must be true or false"),
    ({"label_smoothing": 1.0}, r"method_options.label_smoothing must be a number in \[0, 1\)"),
])
def test_bad_options_name_the_key(options: dict, message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        method(**options)
