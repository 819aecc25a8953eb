"""ProtoNet's metric options: cosine similarity with a (learned) scale, as Meta-Baseline's classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_exported_classifier_matches, quick_recipe, random_episode, trained

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


@pytest.mark.parametrize(("options", "message"), [
    ({"distance": "manhattan"}, "method_options.distance must be one of euclidean, cosine"),
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
