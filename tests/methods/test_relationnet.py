from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fsltool.checkpoint import load_trained
from fsltool.errors import FsltoolError
from fsltool.export import ExportReport
from fsltool.methods import build_method
from fsltool.methods.relationnet import RelationNet
from fsltool.models import build_backbone
from fsltool.recipe import load_recipe
from tests.conftest import assert_embedding_once_matches_per_episode, assert_exported_classifier_matches, quick_recipe, random_episode, trained

REPO = Path(__file__).resolve().parents[2]


def fresh(backbone: str = "conv4-relation", **options: object) -> RelationNet:
    torch.manual_seed(0)
    method = build_method("relationnet", build_backbone(backbone, 1, [0.1], [0.3]), options)
    assert isinstance(method, RelationNet)
    return method


@pytest.fixture(scope="module")
def run(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "relationnet"
    recipe = quick_recipe(synthetic_file, output, method="relationnet", backbone="conv4-relation",
                          shape="5w1s5q", episodes=40, log_every=10)
    return trained(recipe)



def test_short_training_lowers_the_mse_loss(run: Path) -> None:
    """40 episodes of 5-way 1-shot: the loss falls in every 10-episode window and accuracy leaves chance (20%)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["phase"] == "train"]
    losses = [row["loss"] for row in train]
    assert len(losses) == 4 and losses == sorted(losses, reverse=True) and losses[-1] < 0.9 * losses[0], losses
    assert train[-1]["accuracy"] > train[0]["accuracy"] + 15 and rows[-1]["accuracy"] > 35, rows


@pytest.mark.parametrize(("way", "shot", "query"), [(2, 1, 1), (5, 1, 19), (7, 3, 4), (20, 2, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_scores_are_relations_per_query_and_class(way: int, shot: int, query: int, training: bool) -> None:
    method = fresh().train(training)
    with torch.no_grad():
        scores = method(*random_episode(way, shot, query))
    assert scores.shape == (query, way)
    assert ((scores > 0) & (scores < 1)).all()


def test_split_first_convolution_is_the_papers_concatenation() -> None:
    """The relation module never builds the 128-channel pairs; this builds them and compares."""
    method = fresh().eval()
    support, labels, query = random_episode(4, 3, 5)
    with torch.no_grad():
        support_maps, query_maps = method.backbone(support), method.backbone(query)
        classes = torch.stack([support_maps[labels == c].sum(0) for c in range(4)])
        pairs = torch.cat([classes.expand(5, -1, -1, -1, -1), query_maps.unsqueeze(1).expand(-1, 4, -1, -1, -1)], 2)
        relation = method.relation
        expected = relation.head(relation.second(relation.first(pairs.flatten(0, 1))).flatten(1)).view(5, 4)
        torch.testing.assert_close(method(support, labels, query), expected)


def test_the_authors_unpadded_network_has_their_map_sizes_and_is_the_concatenation() -> None:
    """pad_first_two: false and an unpadded relation module flattening its maps, as the authors' miniImageNet code:
    64x19x19 maps at 84 px, 64x3x3 = 576 inputs to the FC; the split first convolution is still exact."""
    torch.manual_seed(0)
    backbone = build_backbone("conv4-relation", 3, [0.5] * 3, [0.25] * 3, image_size=84, pad_first_two=False)
    assert backbone.map_shape == (64, 19, 19)
    method = build_method("relationnet", backbone, {"relation_padding": False, "relation_flatten": True}).eval()
    assert method.relation.head[0].in_features == 576
    way, shot, queries = 3, 2, 4
    support, labels = torch.rand(way * shot, 3, 84, 84), torch.arange(way).repeat_interleave(shot)
    query = torch.rand(queries, 3, 84, 84)
    with torch.no_grad():
        support_maps, query_maps = method.backbone(support), method.backbone(query)
        classes = torch.stack([support_maps[labels == c].sum(0) for c in range(way)])
        pairs = torch.cat([classes.expand(queries, -1, -1, -1, -1), query_maps.unsqueeze(1).expand(-1, way, -1, -1, -1)], 2)
        relation = method.relation
        expected = relation.head(relation.second(relation.first(pairs.flatten(0, 1))).flatten(1)).view(queries, way)
        torch.testing.assert_close(method(support, labels, query), expected)
    # Omniglot, as the authors' code: unpadded embedding (64x5x5 at 28 px), padded module ending 1x1
    omniglot = build_backbone("conv4-relation", 1, [0.1], [0.3], pad_first_two=False)
    assert omniglot.map_shape == (64, 5, 5)
    assert build_method("relationnet", omniglot, {"relation_flatten": True}).relation.head[0].in_features == 64


def test_embedding_once_gives_the_per_episode_scores(run: Path, synthetic_file: Path) -> None:
    method = load_trained(run).method
    assert_embedding_once_matches_per_episode(method, synthetic_file)


def test_export_verifies_and_writes_feature_map_embeddings(exported: tuple[Path, ExportReport]) -> None:
    out, report = exported
    assert {p.name for p in out.iterdir()} == {"embedding.onnx", "embedding.ts", "classifier.onnx", "classifier.ts", "model.json"}
    assert report.verification is not None and report.verification.agreement == 1.0
    scripted = torch.jit.load(str(out / "embedding.ts"))
    assert scripted(torch.rand(3, 1, 28, 28)).shape == (3, 64, 7, 7)


@pytest.mark.parametrize(("way", "shot", "query"), [(2, 1, 1), (7, 3, 4), (20, 5, 30)])
def test_exported_classifier_has_dynamic_way_shot_query(exported: tuple[Path, ExportReport], run: Path, way: int, shot: int, query: int) -> None:
    assert_exported_classifier_matches(exported[0], load_trained(run).method, way, shot, query)


@pytest.mark.parametrize(
    ("backbone", "options", "message"),
    [
        ("conv4", {}, r"flattens them: use 'backbone: conv4-relation'"),
        ("conv4-relation", {"relation_hidden": 0}, r"method_options.relation_hidden must be a positive integer, got 0"),
        ("conv4-relation", {"relation_hidden": "8"}, r"method_options.relation_hidden must be a positive integer, got '8'"),
        ("conv4-relation", {"relation_padding": "no"}, r"method_options.relation_padding must be true or false, got 'no'"),
        ("conv4-relation", {"relation_flatten": 1}, r"method_options.relation_flatten must be true or false, got 1"),
    ],
)
def test_bad_options_are_named(backbone: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        fresh(backbone, **options)


def test_an_unpadded_module_on_maps_too_small_is_a_one_line_error() -> None:
    with pytest.raises(FsltoolError, match=r"relation_padding: false needs feature maps of at least 8x8 .* gives 7x7"):
        fresh(relation_padding=False)
    with pytest.raises(FsltoolError, match="backbone_options.pad_first_two must be true or false"):
        build_backbone("conv4-relation", 1, [0.1], [0.3], pad_first_two="no")


def test_unknown_option_is_caught_when_the_recipe_loads(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: d\noutput: o\nmethod: relationnet\nbackbone: conv4-relation\nmethod_options:\n  relation_hiden: 8\n")
    with pytest.raises(FsltoolError, match=r"method 'relationnet' has no option 'relation_hiden' \(did you mean 'relation_hidden'\?\)"):
        load_recipe(recipe)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("relationnet-*w*s.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_build(path: Path) -> None:
    recipe = load_recipe(path)
    channels, size = (3, 84) if path.parent.name == "miniimagenet" else (1, 28)  # the unpadded miniImageNet module needs 84 px
    backbone = build_backbone(recipe.backbone, channels, [0.1] * channels, [0.3] * channels, image_size=size, **recipe.backbone_options)
    build_method(recipe.method, backbone, recipe.method_options)
