from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape, episode_labels
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import evaluate
from fsltool.export import ExportReport, export_run
from fsltool.methods import build_method
from fsltool.methods.matchingnet import MatchingNet
from fsltool.models import build_backbone
from fsltool.recipe import load_recipe
from fsltool.train import meta_train
from tests.conftest import assert_embedding_once_matches_per_episode, assert_exported_classifier_matches, quick_recipe, random_episode

REPO = Path(__file__).resolve().parents[2]
SHAPES = [(2, 1, 1), (5, 1, 19), (7, 3, 4), (20, 2, 3)]


def fresh(backbone: str = "conv4", **options: object) -> MatchingNet:
    torch.manual_seed(0)
    method = build_method("matchingnet", build_backbone(backbone, 1, [0.1], [0.3]), options)
    assert isinstance(method, MatchingNet)
    return method


def train_run(data: Path, output: Path, fce: bool) -> Path:
    recipe = quick_recipe(data, output, method="matchingnet", method_options={"fce": fce}, shape="5w1s5q", episodes=40, log_every=10)
    recipe.validation.every = 40
    meta_train(recipe, quiet=True)
    return output


@pytest.fixture(scope="module")
def plain_run(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(synthetic_file, tmp_path_factory.mktemp("runs") / "matchingnet", fce=False)


@pytest.fixture(scope="module")
def fce_run(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(synthetic_file, tmp_path_factory.mktemp("runs") / "matchingnet-fce", fce=True)


@pytest.fixture(scope="module")
def exported(plain_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExportReport]:
    out = tmp_path_factory.mktemp("export")
    return out, export_run(plain_run, out, verify_episodes=5)


@pytest.mark.parametrize("run_fixture", ["plain_run", "fce_run"])
def test_short_training_lowers_the_loss(run_fixture: str, request: pytest.FixtureRequest) -> None:
    """40 episodes of 5-way 1-shot, with and without FCE: the loss falls in every 10-episode window and accuracy
    leaves chance (20%). Plain cosine bounds the loss to [about 0.43, log 5 = 1.61] at 5-way 1-shot, so it moves slowly."""
    run: Path = request.getfixturevalue(run_fixture)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["phase"] == "train"]
    assert len(losses) == 4 and losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.1, losses
    assert rows[-1]["phase"] == "val" and rows[-1]["accuracy"] > 35, rows


@pytest.mark.parametrize(("way", "shot", "query"), SHAPES)
@pytest.mark.parametrize("fce", [False, True])
def test_scores_are_log_probabilities_per_query_and_class(way: int, shot: int, query: int, fce: bool) -> None:
    method = fresh(fce=fce)
    with torch.no_grad():
        scores = method(*random_episode(way, shot, query))
    assert scores.shape == (query, way)
    torch.testing.assert_close(scores.exp().sum(-1), torch.ones(query))


def test_attention_scale_sharpens_the_attention_and_keeps_probabilities() -> None:
    """Scale s multiplies the cosines before the softmax: scale 1 is the paper's attention, a larger scale puts
    more weight on the most similar support image of each query."""
    support, labels, query = random_episode(5, 1, 10)
    paper, sharp = fresh(), fresh(attention_scale=10)
    sharp.load_state_dict(paper.state_dict())
    paper.eval(), sharp.eval()  # BatchNorm with running statistics: the backbone embeds images one by one
    with torch.no_grad():
        embedded_support, embedded_query = paper.backbone(support), paper.backbone(query)
        cosine = F.normalize(embedded_query, dim=-1) @ F.normalize(embedded_support, dim=-1).T
        for method, scale in ((paper, 1.0), (sharp, 10.0)):
            scores = method(support, labels, query)
            torch.testing.assert_close(scores, (scale * cosine).log_softmax(-1), rtol=1e-4, atol=1e-5)  # 1 shot: a class is an image
    assert sharp(support, labels, query).max(-1).values.mean() > paper(support, labels, query).max(-1).values.mean()


def test_default_cross_entropy_is_the_papers_negative_log_likelihood() -> None:
    """The step keeps Method's cross-entropy on the log-probabilities: same loss and gradients as nll_loss."""
    method = fresh()
    support, labels, query = random_episode(5, 1, 5)
    query_labels = episode_labels(EpisodeShape(5, 1, 1))[1]
    scores = method(support, labels, query)
    (ce_grad,) = torch.autograd.grad(F.cross_entropy(scores, query_labels), method.backbone.features[0][0].weight, retain_graph=True)
    (nll_grad,) = torch.autograd.grad(F.nll_loss(scores, query_labels), method.backbone.features[0][0].weight)
    torch.testing.assert_close(F.cross_entropy(scores, query_labels), F.nll_loss(scores, query_labels))
    torch.testing.assert_close(ce_grad, nll_grad, rtol=1e-4, atol=1e-7)


def test_embedding_once_gives_the_per_episode_scores(plain_run: Path, synthetic_file: Path) -> None:
    method = load_trained(plain_run).method
    assert method.embeds_independently
    assert_embedding_once_matches_per_episode(method, synthetic_file)


def test_fce_embeddings_depend_on_the_episode_so_evaluation_goes_episode_by_episode(fce_run: Path, synthetic_file: Path) -> None:
    method = load_trained(fce_run).method
    assert not method.embeds_independently
    with pytest.raises(NotImplementedError):
        method.embed(torch.rand(2, 1, 28, 28))
    with FewShotData(synthetic_file) as data:
        result = evaluate(method, data, "test", EpisodeShape(5, 1, 5), episodes=10)
    assert len(result.accuracies) == 10


def test_export_writes_both_graphs_and_verifies(exported: tuple[Path, ExportReport]) -> None:
    out, report = exported
    assert {p.name for p in out.iterdir()} == {"embedding.onnx", "embedding.ts", "classifier.onnx", "classifier.ts", "model.json"}
    assert report.verification is not None and report.verification.agreement == 1.0


@pytest.mark.parametrize(("way", "shot", "query"), [(2, 1, 1), (7, 3, 4), (20, 5, 30)])
def test_exported_classifier_has_dynamic_way_shot_query(exported: tuple[Path, ExportReport], plain_run: Path, way: int, shot: int, query: int) -> None:
    assert_exported_classifier_matches(exported[0], load_trained(plain_run).method, way, shot, query)


def test_fce_export_is_refused_with_a_clear_error(fce_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match=r"with fce cannot be exported: .* support-set LSTM"):
        export_run(fce_run, tmp_path / "export", verify_episodes=0)
    assert not (tmp_path / "export").exists()  # not even the folder the refused export would have made


@pytest.mark.parametrize(
    ("backbone", "options", "message"),
    [
        ("conv4", {"fce": True, "fce_steps": 0}, r"method_options.fce_steps must be a positive integer, got 0"),
        ("conv4", {"fce_steps": 3}, r"method_options.fce_steps applies only with 'fce: true'"),
        ("conv4", {"fce": "yes"}, r"method_options.fce must be true or false, got 'yes'"),
        ("conv4", {"attention_scale": 0}, r"method_options.attention_scale must be a number in \(0, 40\], got 0"),
        ("conv4", {"attention_scale": 100.0}, r"method_options.attention_scale must be a number in \(0, 40\], got 100.0"),
        ("conv4-relation", {}, r"keeps feature maps: use a flattening backbone"),
    ],
)
def test_bad_options_are_named(backbone: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        fresh(backbone, **options)


def test_fce_on_embeddings_wider_than_the_lstms_is_a_clear_error() -> None:
    """conv4 on 56x56 images leaves 3x3 maps: 576-d embeddings, but the FCE LSTMs are 64-d (the channel count)."""
    with pytest.raises(FsltoolError, match=r"backbone gives 576-d embeddings but the LSTMs are 64-d"):
        fresh(fce=True)(torch.rand(2, 1, 56, 56), torch.arange(2), torch.rand(1, 1, 56, 56))


def test_unknown_option_is_caught_when_the_recipe_loads(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: d\noutput: o\nmethod: matchingnet\nmethod_options:\n  fce_step: 3\n")
    with pytest.raises(FsltoolError, match=r"method 'matchingnet' has no option 'fce_step' \(did you mean 'fce_steps'\?\)"):
        load_recipe(recipe)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("matchingnet-*w*s.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_build(path: Path) -> None:
    recipe = load_recipe(path)
    build_method(recipe.method, build_backbone(recipe.backbone, 1, [0.1], [0.3], **recipe.backbone_options), recipe.method_options)
