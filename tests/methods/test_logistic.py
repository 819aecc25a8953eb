"""RFS's logistic regression: each episode's penalised multinomial fit at its optimum (checked against the
objective's gradient and an independent L-BFGS solve), every episode at once, through evaluate, and refused where
it cannot serve (meta-training, export)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_episode, run_cli

from fsltool.data.episodes import Episode, EpisodeShape
from fsltool.errors import FsltoolError
from fsltool.methods import build_method, get_method
from fsltool.methods.logistic import LogisticRegression, conjugate_gradients, fit_logistic, penalised_loss
from fsltool.models import build_backbone


def method(**options: object) -> LogisticRegression:
    torch.manual_seed(0)
    built = build_method("logistic", build_backbone("conv4", 1, [0.1], [0.3], hidden=8), options)
    assert isinstance(built, LogisticRegression)
    return built.eval()


def episodes(count: int, way: int, shot: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm float64 features with shuffled labels, and their one-hot targets: (E, S, D), (E, S, way)."""
    generator = torch.Generator().manual_seed(count * 100 + dim)
    features = F.normalize(torch.randn(count, way * shot, dim, generator=generator, dtype=torch.float64), dim=-1)
    labels = torch.stack([torch.arange(way).repeat_interleave(shot)[torch.randperm(way * shot, generator=generator)]
                          for _ in range(count)])
    return features, F.one_hot(labels, way).double()


def lbfgs_optimum(features: torch.Tensor, targets: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same objective minimised over the full D-dimensional weights by torch's L-BFGS: an independent solver."""
    weights = torch.zeros(features.shape[0], targets.shape[-1], features.shape[-1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(features.shape[0], targets.shape[-1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=5000, tolerance_grad=1e-12, tolerance_change=1e-16,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = penalised_loss(c, weights, bias, features, targets).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach(), bias.detach()


@pytest.mark.parametrize(("way", "shot", "dim", "c"), [(5, 1, 64, 1.0), (5, 5, 640, 1.0), (5, 5, 4, 1.0), (3, 2, 16, 0.1)])
def test_the_fit_is_the_penalised_optimum(way: int, shot: int, dim: int, c: float) -> None:
    """Zero gradient of C x cross-entropy + |W|^2 / 2 (intercepts free), and L-BFGS's weights; fewer features than
    support images (dim 4 < 25) included."""
    features, targets = episodes(3, way, shot, dim)
    weights, bias = fit_logistic(features, targets, c, tolerance=1e-10, max_iterations=100)
    weights.requires_grad_(), bias.requires_grad_()
    penalised_loss(c, weights, bias, features, targets).sum().backward()
    assert weights.grad.abs().max() < 1e-8 and bias.grad.abs().max() < 1e-8
    expected_weights, expected_bias = lbfgs_optimum(features, targets, c)
    torch.testing.assert_close(weights.detach(), expected_weights, rtol=0, atol=1e-6)
    centred = (bias - bias.mean(-1, keepdim=True)).detach()  # the intercepts' common shift changes no prediction
    torch.testing.assert_close(centred, expected_bias - expected_bias.mean(-1, keepdim=True), rtol=0, atol=1e-6)


def test_conjugate_gradients_solve_each_episodes_system_to_its_goal() -> None:
    generator = torch.Generator().manual_seed(11)
    factors = torch.randn(3, 40, 40, generator=generator, dtype=torch.float64)
    matrices = factors @ factors.transpose(1, 2) + torch.eye(40, dtype=torch.float64)
    right = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    goal = torch.tensor([1e-3, 1e-8, 1e-12], dtype=torch.float64)
    solution = conjugate_gradients(lambda v: (matrices @ v.unsqueeze(-1)).squeeze(-1), right, goal, 400)
    residual = (matrices @ solution.unsqueeze(-1)).squeeze(-1) - right
    assert (residual.norm(dim=1) <= goal).all()
    assert residual[0].norm() > 1e-10  # the loose episode stopped early, not at the tightest goal
    torch.testing.assert_close(solution[2], torch.linalg.solve(matrices[2], right[2]), rtol=0, atol=1e-9)


def test_many_episodes_at_once_equal_one_at_a_time() -> None:
    net = method()
    generator = torch.Generator().manual_seed(3)
    support, query = torch.randn(4, 10, 32, generator=generator), torch.randn(4, 7, 32, generator=generator)
    labels = torch.arange(5).repeat_interleave(2).expand(4, -1)
    together = net.scores_from_embeddings(support, labels, query, 5)
    alone = torch.cat([net.scores_from_embeddings(support[i : i + 1], labels[i : i + 1], query[i : i + 1], 5) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert together.shape == (4, 7, 5)


def test_normalize_divides_the_features_by_their_norm() -> None:
    """RFS's normalize(): scaling an image's embedding changes nothing with it, and does without it."""
    generator = torch.Generator().manual_seed(5)
    support, query = torch.randn(1, 10, 16, generator=generator), torch.randn(1, 6, 16, generator=generator)
    labels = torch.arange(5).repeat_interleave(2)[None]
    scaled = support * torch.rand(1, 10, 1, generator=generator).add(0.5) * 3
    on, off = method(), method(normalize=False)
    torch.testing.assert_close(on.scores_from_embeddings(scaled, labels, query, 5), on.scores_from_embeddings(support, labels, query, 5))
    assert not torch.allclose(off.scores_from_embeddings(scaled, labels, query, 5), off.scores_from_embeddings(support, labels, query, 5))


def test_separable_clusters_are_classified() -> None:
    generator = torch.Generator().manual_seed(7)
    centres = torch.randn(5, 32, generator=generator) * 3
    support = (centres.repeat_interleave(3, 0) + torch.randn(15, 32, generator=generator))[None]
    query = (centres.repeat_interleave(4, 0) + torch.randn(20, 32, generator=generator))[None]
    scores = method().scores_from_embeddings(support, torch.arange(5).repeat_interleave(3)[None], query, 5)
    assert (scores.argmax(-1) == torch.arange(5).repeat_interleave(4)).float().mean() > 0.9


def test_a_fit_that_cannot_converge_in_the_steps_given_is_an_error() -> None:
    features, targets = episodes(1, 5, 2, 8)
    with pytest.raises(FsltoolError, match=r"did not reach a gradient below 1e-09 in 1 Newton steps; raise method_options.max_iterations"):
        fit_logistic(features, targets, 1.0, tolerance=1e-9, max_iterations=1)


@pytest.mark.parametrize(("options", "message"), [
    ({"c": 0}, "method_options.c must be a positive number, got 0"),
    ({"normalize": "yes"}, "method_options.normalize must be true or false, got 'yes'"),
    ({"tolerance": -1.0}, "method_options.tolerance must be a positive number"),
    ({"max_iterations": 0}, "method_options.max_iterations must be a positive integer"),
])
def test_bad_options_name_the_key(options: dict, message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        method(**options)


def test_is_neither_meta_trained_nor_exported() -> None:
    net = method()
    assert not get_method("logistic").meta_trainable
    support, labels, query = random_episode(5, 1, 5)
    episode = Episode(support, labels, query, torch.arange(5), EpisodeShape(5, 1, 1))
    with pytest.raises(FsltoolError, match="method 'logistic' is not meta-trained"):
        net.step(episode)
    with pytest.raises(FsltoolError, match="cannot be exported: it solves a logistic regression on each episode"):
        net.export_graphs(episode)


def test_evaluate_scores_a_run_with_it(trained_run: Path, tmp_path: Path) -> None:
    """`fsltool evaluate RUN --method logistic` over a protonet run's backbone, as over a pretraining run's."""
    out = tmp_path / "logistic.json"
    code, stdout, stderr = run_cli("evaluate", str(trained_run), "--method", "logistic", "--json", str(out))
    assert code == 0, stderr
    assert "stored test episodes" in stdout
    import json

    result = json.loads(out.read_text())
    assert result["method"] == "logistic" and 20 < result["accuracy"] <= 100
