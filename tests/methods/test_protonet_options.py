"""ProtoNet's metric options: cosine similarity with a (learned) scale, as Meta-Baseline's classifier; the squared
distance per dimension under a linear learned scale, as MetaOptNet's ProtoNet head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_exported_classifier_matches, assert_resume_from_episode_4_is_exact, quick_recipe, random_episode, trained

from fsltool.checkpoint import load_trained
from fsltool.errors import FsltoolError
from fsltool.export import export_run
from fsltool.methods import build_method
from fsltool.models import build_backbone


def method(**options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method("protonet", build_backbone("conv4", 1, [0.1], [0.3], hidden=8), options)


def test_cosine_scores_are_scaled_cosines_to_the_class_means() -> None:
    net = method(distance="cosine", scale=7.0).eval()
    support, labels, query = random_episode(4, 3, 5)
    with torch.no_grad():
        embedded_support, embedded_query = net.backbone(support), net.backbone(query)
        prototypes = torch.stack([embedded_support[labels == c].mean(0) for c in range(4)])
        expected = 7.0 * F.cosine_similarity(embedded_query.unsqueeze(1), prototypes.unsqueeze(0), dim=-1)
        torch.testing.assert_close(net(support, labels, query), expected, rtol=1e-5, atol=1e-5)


def test_euclidean_default_is_the_papers_score() -> None:
    net = method().eval()
    support, labels, query = random_episode(3, 2, 4)
    with torch.no_grad():
        embedded_support, embedded_query = net.backbone(support), net.backbone(query)
        prototypes = torch.stack([embedded_support[labels == c].mean(0) for c in range(3)])
        torch.testing.assert_close(net(support, labels, query), -torch.cdist(embedded_query, prototypes).pow(2), rtol=1e-4, atol=1e-4)
    assert "log_scale" not in net.state_dict()  # older checkpoints (without the option) still load


def test_learned_scale_gets_a_gradient_and_is_saved() -> None:
    net = method(distance="cosine", learn_scale=True)
    support, labels, query = random_episode(4, 1, 4)
    F.cross_entropy(net(support, labels, query), torch.arange(4)).backward()
    assert net.log_scale.grad is not None and net.log_scale.grad.abs() > 0
    assert "log_scale" in net.state_dict()


def test_metaoptnet_head_divides_by_the_dimension_under_a_linear_learned_scale() -> None:
    """MetaOptNet's ProtoNet head: scale * -||q - p||^2 / d, the scale a parameter learned from 1 as it is."""
    net = method(divide_by_dimension=True, learn_scale=True, scale_parameter="linear").eval()
    support, labels, query = random_episode(3, 2, 4)
    embedded_support, embedded_query = net.backbone(support), net.backbone(query)
    prototypes = torch.stack([embedded_support[labels == c].mean(0) for c in range(3)])
    expected = -torch.cdist(embedded_query, prototypes).pow(2) / embedded_query.shape[-1]
    scores = net(support, labels, query)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    scores.sum().backward()
    torch.testing.assert_close(net.linear_scale.grad, expected.sum().detach(), rtol=1e-4, atol=1e-5)  # d(scale * s)/d scale = s
    assert set(net.state_dict()) - set(method().state_dict()) == {"linear_scale"}
    with torch.no_grad():
        net.linear_scale.fill_(3.0)
    torch.testing.assert_close(net(support, labels, query), 3.0 * expected.detach(), rtol=1e-4, atol=1e-5)


def test_label_smoothing_softens_the_training_targets_as_metaoptnet() -> None:
    """torch's label_smoothing e * way / (way - 1) is MetaOptNet's eps e: 1 - e on the true class, e / (way - 1) elsewhere."""
    from fsltool.data.episodes import Episode, EpisodeShape

    way, eps = 5, 0.1
    support, labels, query = random_episode(way, 1, way * 3)
    episode = Episode(support, labels, query, torch.arange(way).repeat_interleave(3), EpisodeShape(way, 1, 3))
    net = method(label_smoothing=eps * way / (way - 1))
    output = net.step(episode)
    targets = torch.full((len(episode.query_labels), way), eps / (way - 1))
    targets[torch.arange(len(targets)), episode.query_labels] = 1 - eps
    expected = -(targets * F.log_softmax(output.scores, -1)).sum(-1).mean()
    torch.testing.assert_close(output.loss, expected)
    assert method().step(episode).loss.item() != pytest.approx(output.loss.item())


@pytest.mark.parametrize(("options", "message"), [
    ({"label_smoothing": 1.0}, "method_options.label_smoothing must be a number in \\[0, 1\\)"),
    ({"distance": "manhattan"}, "method_options.distance must be one of euclidean, cosine"),
    ({"distance": "cosine", "divide_by_dimension": True}, "divide_by_dimension divides the squared euclidean distance"),
    ({"divide_by_dimension": "yes"}, "divide_by_dimension must be true or false"),
    ({"scale_parameter": "linear"}, "scale_parameter says how the learned scale is parametrised: it needs learn_scale: true"),
    ({"learn_scale": True, "scale_parameter": "exp"}, "scale_parameter must be one of log, linear"),
    ({"scale": -1.0}, "method_options.scale must be a positive number"),
    ({"learn_scale": "yes"}, "method_options.learn_scale must be true or false"),
])
def test_bad_options_name_the_key(options: dict, message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        method(**options)


def test_cosine_run_exports_with_its_learned_scale(synthetic_file: Path, tmp_path: Path) -> None:
    run = trained(quick_recipe(synthetic_file, tmp_path / "run", method_options={"distance": "cosine", "learn_scale": True}))
    export_run(run, tmp_path / "export", verify_episodes=5)
    net = load_trained(run).method
    assert net.log_scale.item() != pytest.approx(torch.tensor(10.0).log().item())  # it was learned
    assert_exported_classifier_matches(tmp_path / "export", net, 5, 2, 7)


def test_metaoptnet_head_run_trains_exports_and_resumes_exactly(synthetic_file: Path, tmp_path: Path) -> None:
    options = {"divide_by_dimension": True, "learn_scale": True, "scale_parameter": "linear"}
    run = trained(quick_recipe(synthetic_file, tmp_path / "run", method_options=options, keep_checkpoints=2))
    net = load_trained(run).method
    assert net.linear_scale.item() != pytest.approx(1.0)  # it was learned
    export_run(run, tmp_path / "export", verify_episodes=5)
    assert_exported_classifier_matches(tmp_path / "export", net, 5, 2, 7)
    assert_resume_from_episode_4_is_exact(quick_recipe(synthetic_file, tmp_path / "again", method_options=options, keep_checkpoints=2), run)
