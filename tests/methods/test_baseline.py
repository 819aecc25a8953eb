"""Baseline and Baseline++: a head fitted per episode on frozen embeddings, all episodes at once, by the
reference's SGD protocol written as tensor operations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_embedding_once_matches_per_episode, assert_queries_independent, random_episode
from torch import nn

from fsltool.checkpoint import load_checkpoint, save_checkpoint
from fsltool.data.episodes import Episode, EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import evaluate
from fsltool.export import export_run
from fsltool.methods import build_method, get_method
from fsltool.methods.baseline import CosineHead, EpisodeHeadMethod, Head, LinearHead, epoch_orders, unit_rows

VARIANTS = [("baseline", {}), ("baseline++", {}), ("baseline++", {"weight_norm": False})]
VARIANT_IDS = ["baseline", "baseline++", "baseline++ without weight norm"]
HEADS = [LinearHead(), CosineHead(2.0, weight_norm=True), CosineHead(3.0, weight_norm=False)]


def method(name: str, **options: object) -> EpisodeHeadMethod:
    from fsltool.models import build_backbone

    torch.manual_seed(0)
    built = build_method(name, build_backbone("conv4", 1, [0.1], [0.3], hidden=8), options)
    assert isinstance(built, EpisodeHeadMethod)
    return built.eval()


def embedded_episodes(episodes: int, way: int, shot: int, query: int, dim: int, dtype: torch.dtype = torch.float64):
    """Random embeddings with each episode's support labels in a different order: (E, S, D), (E, S), (E, Q, D)."""
    generator = torch.Generator().manual_seed(episodes * 1000 + shot)
    support = torch.randn(episodes, way * shot, dim, generator=generator, dtype=dtype)
    labels = torch.stack([torch.arange(way).repeat_interleave(shot)[torch.randperm(way * shot, generator=generator)]
                          for _ in range(episodes)])
    return support, labels, torch.randn(episodes, way * query, dim, generator=generator, dtype=dtype)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_many_episodes_at_once_equal_one_at_a_time(name: str, options: dict) -> None:
    net = method(name, **options)
    support, labels, query = embedded_episodes(6, 5, 3, 4, 32)  # 15 support: mini-batches of 4, 4, 4, 3
    with torch.inference_mode():
        batched = net.scores_from_embeddings(support, labels, query, 5)
        for e in range(6):
            alone = net.scores_from_embeddings(support[e : e + 1], labels[e : e + 1], query[e : e + 1], 5)
            torch.testing.assert_close(batched[e : e + 1], alone, rtol=0, atol=1e-10)


def reference_head(name: str, options: dict, way: int, dim: int, start: list[torch.Tensor]) -> nn.Module:
    """The reference's per-episode module, as torch builds it: nn.Linear, or a bias-free one under weight norm."""
    if name == "baseline":
        head = nn.Linear(dim, way).double()
        head.weight.data, head.bias.data = start[0].double(), start[1].double()
        return head
    head = nn.Linear(dim, way, bias=False).double()
    head.weight.data = start[0].double()
    if options.get("weight_norm", True):
        head = nn.utils.parametrizations.weight_norm(head, dim=0)
        head.parametrizations.weight.original0.data = start[1].double().unsqueeze(1)  # g
        head.parametrizations.weight.original1.data = start[0].double()  # v
    return head


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_one_episode_is_torch_sgd_on_the_reference_module(name: str, options: dict) -> None:
    """The batched closed-form fit equals the reference loop: an nn.Module head, autograd, torch.optim.SGD with
    momentum/dampening/weight decay, distLinear's feature (and, without weight norm, weight) normalisation."""
    net = method(name, epochs=7, **options)
    support, labels, query = embedded_episodes(1, 5, 2, 3, 16)
    head = net.head(5)
    generator = torch.Generator().manual_seed(net.seed)
    module = reference_head(name, options, 5, 16, head.initial(5, 16, generator))
    orders = epoch_orders(10, net.epochs, generator)
    optimizer = torch.optim.SGD(module.parameters(), lr=net.lr, momentum=net.momentum, dampening=net.dampening, weight_decay=net.weight_decay)
    scale = 1.0 if name == "baseline" else head.scale

    def forward(features: torch.Tensor) -> torch.Tensor:
        if name == "baseline":
            return module(features)
        if not options.get("weight_norm", True):
            module.weight.data = unit_rows(module.weight.data)
        return scale * module(unit_rows(features))

    for batch in (batch for order in orders for batch in order.split(net.batch_size)):  # 4, 4, 2 of 10
        optimizer.zero_grad()
        F.cross_entropy(forward(support[0, batch]), labels[0, batch]).backward()
        optimizer.step()
    with torch.no_grad():
        expected = forward(query[0])
    with torch.inference_mode():
        torch.testing.assert_close(net.scores_from_embeddings(support, labels, query, 5)[0], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("head", HEADS, ids=["linear", "cosine, weight norm", "cosine"])
def test_closed_form_gradients_are_autograds(head: Head) -> None:
    generator = torch.Generator().manual_seed(3)
    features = head.features(torch.randn(2, 4, 6, generator=generator, dtype=torch.float64))
    targets = F.one_hot(torch.tensor([[0, 2, 1, 1], [2, 2, 0, 1]]), 3).double()
    params = [torch.stack([p, p * 1.5 + 0.1]).double().requires_grad_() for p in head.initial(3, 6, generator)]
    scores = head.scores(params, features)
    loss = -(targets * scores.log_softmax(-1)).sum(-1).mean(-1).sum()  # each episode's batch-mean cross-entropy
    expected = torch.autograd.grad(loss, params)
    closed_form = head.gradients([p.detach() for p in params], features, targets)
    for got, want in zip(closed_form, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def gaussian_clusters(episodes: int, way: int, shot: int, query: int, dim: int) -> tuple[torch.Tensor, ...]:
    """Episodes of well-separated classes: each class a Gaussian (std 1) around its own random mean (std 4)."""
    generator = torch.Generator().manual_seed(7)
    means = 4 * torch.randn(episodes, way, 1, dim, generator=generator)
    support = (means + torch.randn(episodes, way, shot, dim, generator=generator)).flatten(1, 2)
    query_points = (means + torch.randn(episodes, way, query, dim, generator=generator)).flatten(1, 2)
    return support, torch.arange(way).repeat_interleave(shot).expand(episodes, -1), query_points, torch.arange(way).repeat_interleave(query)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_fitted_head_separates_clusters_the_unfitted_one_does_not(name: str, options: dict) -> None:
    net = method(name, **options)
    support, labels, query, query_labels = gaussian_clusters(20, 5, 1, 15, 64)
    with torch.inference_mode():
        fitted = net.scores_from_embeddings(support, labels, query, 5)
        head = net.head(5)
        start = [p.expand(20, *p.shape) for p in head.initial(5, 64, torch.Generator().manual_seed(net.seed))]
        unfitted = head.scores(head.project(start), head.features(query))
    assert (fitted.argmax(-1) == query_labels).float().mean() > 0.98
    assert (unfitted.argmax(-1) == query_labels).float().mean() < 0.5


def test_seeded_order_is_reproducible_and_the_same_for_every_batch_of_episodes() -> None:
    first = epoch_orders(25, 3, torch.Generator().manual_seed(0))
    assert all(torch.equal(order.sort().values, torch.arange(25)) for order in first)  # each epoch a permutation
    assert not torch.equal(first[0], first[1])  # a fresh one
    assert torch.equal(first, epoch_orders(25, 3, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, epoch_orders(25, 3, torch.Generator().manual_seed(1)))
    support, labels, query = embedded_episodes(7, 5, 5, 3, 24, torch.float32)
    net = method("baseline++")
    with torch.inference_mode():
        alone = net.scores_from_embeddings(support[3:4], labels[3:4], query[3:4], 5)
        torch.testing.assert_close(net.scores_from_embeddings(support, labels, query, 5)[3:4], alone, rtol=1e-5, atol=1e-6)
        assert torch.equal(net.scores_from_embeddings(support[3:4], labels[3:4], query[3:4], 5), alone)
        other_seed = method("baseline++", seed=1).scores_from_embeddings(support[3:4], labels[3:4], query[3:4], 5)
    assert not torch.allclose(other_seed, alone)


def test_scale_defaults_to_the_references() -> None:
    net = method("baseline++")
    assert net.head(5).scale == 2.0 and net.head(200).scale == 2.0 and net.head(201).scale == 10.0
    assert method("baseline++", scale=4).head(201).scale == 4


@pytest.mark.parametrize(("name", "options", "message"), [
    ("baseline", {"lr": 0}, "method_options.lr must be a positive number, got 0"),
    ("baseline", {"lr": "0.01"}, "method_options.lr must be a positive number"),
    ("baseline", {"momentum": 1.0}, r"method_options.momentum must be a number in \[0, 1\)"),
    ("baseline", {"dampening": -0.1}, r"method_options.dampening must be a number in \[0, 1\]"),
    ("baseline", {"weight_decay": float("nan")}, "method_options.weight_decay must be a non-negative number"),
    ("baseline", {"epochs": 0}, "method_options.epochs must be a positive integer, got 0"),
    ("baseline", {"batch_size": 2.5}, "method_options.batch_size must be a positive integer"),
    ("baseline", {"seed": True}, "method_options.seed must be a non-negative integer, got True"),
    ("baseline++", {"scale": -2}, "method_options.scale must be a positive number"),
    ("baseline++", {"weight_norm": "yes"}, "method_options.weight_norm must be true or false"),
    ("baseline++", {"momentum": "high"}, "method 'baseline\\+\\+': method_options.momentum must be a number"),
])
def test_bad_options_name_the_key(name: str, options: dict, message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        method(name, **options)


@pytest.mark.parametrize("name", ["baseline", "baseline++"])
def test_forward_fits_on_the_support_and_scores_queries_independently(name: str) -> None:
    net = method(name)
    support, labels, query = random_episode(5, 2, 7)
    with torch.inference_mode():
        assert net(support, labels, query).shape == (7, 5)
    assert_queries_independent(net)


@pytest.mark.parametrize("name", ["baseline", "baseline++"])
def test_is_not_meta_trained(name: str) -> None:
    net = method(name)
    assert not get_method(name).meta_trainable and get_method("protonet").meta_trainable
    support, labels, query = random_episode(5, 1, 5)
    episode = Episode(support, labels, query, torch.arange(5), EpisodeShape(5, 1, 1))
    message = f"method '{name}' is not meta-trained: its backbone comes from `fsltool pretrain`"
    with pytest.raises(FsltoolError, match=message.replace("+", r"\+")):
        net.step(episode)
    with pytest.raises(FsltoolError, match="meta-train protonet instead"):
        net.meta_step([episode])


@pytest.mark.parametrize("name", ["baseline", "baseline++"])
def test_evaluate_end_to_end_on_a_data_file(name: str, synthetic_file: Path) -> None:
    """An untrained conv4: evaluate's embed-once path (inside inference_mode) gives a valid accuracy, the same as
    its episode-by-episode path."""
    net = method(name)
    with FewShotData(synthetic_file) as data:
        result = evaluate(net, data, "test", EpisodeShape(5, 1, 5))
    # Only validity: an untrained conv4's embeddings are short (norm ~0.3), so 200 steps at lr 0.01 barely move the
    # head away from its random start (for baseline its random bias decides, as it would in the reference).
    assert len(result.accuracies) == 30 and ((result.accuracies >= 0) & (result.accuracies <= 1)).all()
    assert not result.transductive
    assert_embedding_once_matches_per_episode(net, synthetic_file)


@pytest.mark.parametrize("name", ["baseline", "baseline++"])
def test_export_is_refused_with_the_reason(name: str, trained_run: Path, tmp_path: Path) -> None:
    state = load_checkpoint(trained_run / "checkpoints" / "best.pt")  # a protonet run's backbone, as if pretrained
    state["model_config"] = {**state["model_config"], "method": name, "method_options": {}}
    checkpoint = tmp_path / "baseline.pt"
    save_checkpoint(checkpoint, state)
    with pytest.raises(FsltoolError, match="fits a new classifier head on each episode's support set .* export the backbone under protonet"):
        export_run(checkpoint, tmp_path / "export", verify_episodes=0)
    assert not (tmp_path / "export" / "embedding.onnx").exists()
