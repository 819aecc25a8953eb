from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import Episode, EpisodeShape
from fsltool.errors import FsltoolError
from fsltool.export import ExportReport
from fsltool.methods import build_method
from fsltool.methods.base import TaskShare, class_onehot
from fsltool.methods.snail import SNAIL, AttentionLayer, DenseLayer
from fsltool.models import build_backbone
from fsltool.recipe import load_recipe
from tests.conftest import assert_queries_independent, assert_embedding_once_matches_per_episode, assert_exported_classifier_matches, quick_recipe, random_episode, trained

REPO = Path(__file__).resolve().parents[2]
SMALL = {"way": 5, "sequence_length": 11, "tc_filters": 16, "attention": [[16, 8], [16, 16], [32, 16]]}


def fresh(backbone: str = "conv4", **options: object) -> SNAIL:
    torch.manual_seed(0)
    method = build_method("snail", build_backbone(backbone, 1, [0.1], [0.3]), {**SMALL, **options})
    assert isinstance(method, SNAIL)
    return method.eval()


@pytest.fixture(scope="module")
def run(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 updates of 8 3-way 1-shot episodes (a 16-filter Conv-4): the meta-batch and learning rate of the
    Omniglot recipes, which leave chance far sooner than single episodes at 1e-3."""
    output = tmp_path_factory.mktemp("runs") / "snail"
    recipe = quick_recipe(synthetic_file, output, method="snail", method_options={**SMALL, "sequence_length": 6},
                          shape="3w1s5q", episodes=120, log_every=24, meta_batch=8, lr=0.003)
    recipe.backbone_options = {"hidden": 16}
    return trained(recipe)



@pytest.mark.parametrize("layer", [DenseLayer(6, 4, 1), DenseLayer(6, 4, 4), AttentionLayer(6, 5, 3)], ids=["dense-d1", "dense-d4", "attention"])
def test_a_layer_never_sees_the_future(layer: torch.nn.Module) -> None:
    """Perturbing step t changes the outputs at t (and after) but none before it."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 6)
    for t in (0, 4, 8):
        changed = x.clone()
        changed[:, t] += 1.0
        before, after = layer(x), layer(changed)
        torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=0)
        assert not torch.allclose(before[:, t], after[:, t])


def test_the_whole_network_is_causal() -> None:
    method = fresh()
    steps = torch.randn(3, 10, method.embedding_size + method.way)
    changed = steps.clone()
    changed[:, 6] += 1.0
    with torch.no_grad():
        before, after = method.sequence_outputs(steps), method.sequence_outputs(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6], rtol=0, atol=0)
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_tc_blocks_have_dilations_up_to_the_sequence_length() -> None:
    """T = 11: ceil(log2 11) = 4 layers of dilation 1, 2, 4, 8 per TC block, two TC blocks."""
    dilations = [layer.dilation for layer in fresh().layers if isinstance(layer, DenseLayer)]
    assert dilations == [1, 2, 4, 8] * 2


def test_each_query_is_scored_as_the_last_step_of_its_own_sequence() -> None:
    """The batched queries (support computed once, each query appended) equal running the whole network on
    support + that one query with a zero label."""
    method = fresh()
    support, labels, query = random_episode(5, 2, 4)
    with torch.no_grad():
        scores = method(support, labels, query)
        support_emb, query_emb = method.backbone(support), method.backbone(query)
        prefix = torch.cat([support_emb, class_onehot(labels, 5, support_emb.dtype)], -1)
        for j in range(4):
            last = torch.cat([query_emb[j], torch.zeros(5)])
            full = method.sequence_outputs(torch.cat([prefix, last[None]])[None])[0, -1]
            torch.testing.assert_close(scores[j], full, rtol=1e-5, atol=1e-5)


def test_queries_do_not_leak_into_each_other() -> None:
    assert_queries_independent(fresh())


def test_short_training_on_the_synthetic_set_improves_accuracy(run: Path) -> None:
    """Training accuracy (3-way, chance 33%) rises by more than 8 points and 5-way validation leaves chance (20%)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["phase"] == "train"]
    assert len(train) == 5 and train[-1]["accuracy"] > train[0]["accuracy"] + 8 and train[-1]["loss"] < train[0]["loss"], train
    assert rows[-1]["phase"] == "val" and rows[-1]["accuracy"] > 25, rows


def prototype_episodes(count: int, way: int, queries: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """1-shot episodes of well-separated embeddings: each class a random 64-d prototype plus noise; the support
    in a random order."""
    prototypes = torch.randn(count, way, 64, generator=generator)
    support_labels = torch.stack([torch.randperm(way, generator=generator) for _ in range(count)])
    query_labels = torch.arange(way).repeat(queries).expand(count, -1)
    support = prototypes.gather(1, support_labels.unsqueeze(-1).expand(-1, -1, 64))
    query = prototypes.gather(1, query_labels.unsqueeze(-1).expand(-1, -1, 64))
    noise = 0.3 * torch.randn(count, way * (1 + queries), 64, generator=generator)
    return support + noise[:, :way], support_labels, query + noise[:, way:], query_labels


def test_training_teaches_queries_to_find_their_labelled_support() -> None:
    """On well-separated embeddings (the backbone's job is left out, to keep this short), 150 updates of 8
    3-way 1-shot episodes take accuracy from chance (33%) to near perfect."""
    method = fresh().train()
    optimizer = torch.optim.Adam(method.parameters(), lr=0.003)
    generator = torch.Generator().manual_seed(0)

    def accuracy() -> float:
        support, support_labels, query, query_labels = prototype_episodes(300, 3, 5, generator)
        with torch.no_grad():
            return (method.scores_from_embeddings(support, support_labels, query, 3).argmax(-1) == query_labels).float().mean().item()

    before = accuracy()
    for _ in range(150):
        support, support_labels, query, query_labels = prototype_episodes(8, 3, 5, generator)
        scores = method.scores_from_embeddings(support, support_labels, query, 3)
        loss = F.cross_entropy(scores.flatten(0, 1), query_labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy()
    assert before < 0.45 and after > 0.85, (before, after)


def test_embedding_once_gives_the_per_episode_scores(run: Path, synthetic_file: Path) -> None:
    assert_embedding_once_matches_per_episode(load_trained(run).method, synthetic_file)


def test_export_verifies(exported: tuple[Path, ExportReport]) -> None:
    out, report = exported
    assert {p.name for p in out.iterdir()} == {"embedding.onnx", "embedding.ts", "classifier.onnx", "classifier.ts", "model.json"}
    assert report.verification is not None and report.verification.agreement == 1.0


@pytest.mark.parametrize(("way", "shot", "query"), [(2, 1, 1), (5, 1, 7), (4, 5, 3), (5, 8, 2)])
def test_exported_classifier_has_dynamic_sequence_length(exported: tuple[Path, ExportReport], run: Path, way: int, shot: int, query: int) -> None:
    """Sequences shorter and longer (41 steps) than the recipe's T = 6, and way below the model's 5."""
    assert_exported_classifier_matches(exported[0], load_trained(run).method, way, shot, query)


def test_a_data_parallel_share_computes_what_one_process_computes_for_its_episodes() -> None:
    """The training loop hands a process its share of the meta-batch: its episodes get the support orders, and so
    the losses, that one process computing the whole meta-batch gives them (without the share they would not)."""
    method = fresh()
    support, labels, query = random_episode(5, 1, 5)
    episodes = [Episode(support + 0.1 * i, labels, query, labels, EpisodeShape(5, 1, 1)) for i in range(4)]
    torch.manual_seed(0)
    whole = [output.loss for output in method.meta_step(episodes)][2:]
    torch.manual_seed(0)
    shared = [output.loss for output in method.meta_step(episodes[2:], TaskShare(2, 4))]
    torch.manual_seed(0)
    alone = [output.loss for output in method.meta_step(episodes[2:])]
    torch.testing.assert_close(shared, whole)
    assert not torch.allclose(torch.stack(alone), torch.stack(whole))


def meta_batch(count: int = 4) -> list[Episode]:
    support, labels, query = random_episode(5, 1, 10)
    query_labels = torch.arange(5).repeat_interleave(2)
    return [Episode(support + 0.1 * i, labels, query - 0.1 * i, query_labels, EpisodeShape(5, 1, 2)) for i in range(count)]


def batch_norm_updates(method: SNAIL) -> int:
    return int(next(m for m in method.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)).num_batches_tracked)


def test_batch_norm_over_the_meta_batch_scores_as_episode_by_episode_with_the_same_statistics() -> None:
    """Under running statistics (eval) both layouts compute the same scores; in training the meta-batch option
    takes one set of batch statistics for all episodes (one BatchNorm update a meta-step), and for a meta-batch of
    one episode it is the per-episode step."""
    by_episode, together = fresh(), fresh(batch_norm_over="meta_batch")
    episodes = meta_batch()
    for train, batch in ((False, episodes), (True, episodes[:1])):
        by_episode.train(train), together.train(train)
        torch.manual_seed(1)
        expected = by_episode.meta_step(batch)
        torch.manual_seed(1)
        got = together.meta_step(batch)
        torch.testing.assert_close([o.scores for o in got], [o.scores for o in expected])
        torch.testing.assert_close([o.loss for o in got], [o.loss for o in expected])
    before = batch_norm_updates(by_episode), batch_norm_updates(together)
    by_episode.meta_step(episodes), together.meta_step(episodes)
    assert (batch_norm_updates(by_episode) - before[0], batch_norm_updates(together) - before[1]) == (4, 1)


def test_more_ways_than_label_slots_is_a_clear_error() -> None:
    with pytest.raises(FsltoolError, match=r"the episode is 6-way but the model has method_options.way = 5 label slots"):
        fresh()(*random_episode(6, 1, 2))


@pytest.mark.parametrize(
    ("backbone", "options", "message"),
    [
        ("conv4", {"way": 1}, r"method_options.way must be at least 2"),
        ("conv4", {"sequence_length": "6"}, r"method_options.sequence_length must be a positive integer, got '6'"),
        ("conv4", {"sequence_length": 1}, r"method_options.sequence_length must be at least 2"),
        ("conv4", {"tc_filters": 0}, r"method_options.tc_filters must be a positive integer, got 0"),
        ("conv4", {"attention": [[64, 32]]}, r"method_options.attention must be three \[key size, value size\] pairs"),
        ("conv4", {"attention": [[64, 32], [1, 1], [0, 2]]}, r"method_options.attention must be a positive integer, got 0"),
        ("conv4", {"batch_norm_over": "batch"}, r"method_options.batch_norm_over must be one of episode, meta_batch, got 'batch'"),
        ("conv4-relation", {}, r"keeps feature maps: use a flattening backbone"),
    ],
)
def test_bad_options_are_named(backbone: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        fresh(backbone, **options)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("snail-*w*s.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_build(path: Path) -> None:
    recipe = load_recipe(path)
    method = build_method(recipe.method, build_backbone(recipe.backbone, 1, [0.1], [0.3], **recipe.backbone_options), recipe.method_options)
    shape = EpisodeShape.parse(recipe.train.shape)
    assert isinstance(method, SNAIL) and method.way == shape.way
    assert recipe.method_options["sequence_length"] == shape.way * shape.shot + 1  # the paper's T = N*K + 1
