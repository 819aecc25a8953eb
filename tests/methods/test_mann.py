from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fsltool.by_instance import accuracy_by_instance
from fsltool.checkpoint import load_trained
from fsltool.cli import main
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import RUNTIMES
from fsltool.export import ExportReport
from fsltool.methods import build_method
from fsltool.methods.mann import MANN, ControllerCell, MemoryCell, content_weights, least_used
from fsltool.models import build_backbone
from fsltool.recipe import load_recipe
from tests.conftest import assert_queries_independent, assert_embedding_once_matches_per_episode, assert_exported_classifier_matches, quick_recipe, random_episode, trained

REPO = Path(__file__).resolve().parents[2]
SMALL = {"way": 5, "hidden": 32, "slots": 12, "slot_size": 8, "heads": 2}


def fresh(backbone: str = "conv4", **options: object) -> MANN:
    torch.manual_seed(0)
    method = build_method("mann", build_backbone(backbone, 1, [0.1], [0.3]), {**SMALL, **options})
    assert isinstance(method, MANN)
    return method.eval()


def memory_cell(gate_bias: float = 0.0) -> MemoryCell:
    """A cell whose write gate is pinned by its bias (weights zeroed): -30 writes to the least-used slots, +30
    to where the heads read last."""
    cell = fresh().unroll.cell
    assert isinstance(cell, MemoryCell)
    with torch.no_grad():
        cell.gates.weight.zero_()
        cell.gates.bias.fill_(gate_bias)
    return cell


def some_state(cell: MemoryCell, generator: torch.Generator) -> list[torch.Tensor]:
    """A mid-sequence state: filled memory, distinct usages, read weights concentrated on slot 5."""
    state = cell.initial_state(1, torch.zeros(1))
    state[2] = torch.randn(1, cell.slots, cell.slot_size, generator=generator)
    state[3] = F.one_hot(torch.full((1, cell.heads), 5), cell.slots).float()
    state[4] = torch.rand(1, cell.slots, generator=generator) + 1.0
    state[4][0, [3, 9]] = torch.tensor([0.2, 0.1])  # slot 9 least used, slot 3 next
    return state


def test_read_weights_are_distributions_at_every_step() -> None:
    cell = memory_cell()
    state = cell.initial_state(3, torch.zeros(1))
    inputs = torch.randn(8, 3, cell.lstm.input_size - cell.heads * cell.slot_size)
    with torch.no_grad():
        for x in inputs:
            state, _ = cell(state, x)
            read_weights = state[3]
            assert (read_weights >= 0).all()
            torch.testing.assert_close(read_weights.sum(-1), torch.ones(3, cell.heads))


def test_content_weights_sum_to_one_even_with_an_empty_slot() -> None:
    memory = torch.randn(2, 6, 4)
    memory[:, 2] = 0  # a zeroed least-used slot: cosine is 0 there, not NaN
    weights = content_weights(torch.randn(2, 3, 4), memory, torch.full((2, 3), 6.0))
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))


def test_least_used_marks_the_n_smallest_usages() -> None:
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.05, 0.3]])
    torch.testing.assert_close(least_used(usage, 2), torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]))


def test_lrua_writes_go_to_the_least_used_slots_and_usage_follows() -> None:
    """Gate closed: both heads write to the 2 least-used slots (9, 3) and nowhere else; slot 9, the least used,
    is emptied first, so it ends up holding exactly the write that slot 3 received on top of its old content.
    Usage = gamma * usage + reads + writes."""
    cell = memory_cell(gate_bias=-30.0)
    state = some_state(cell, torch.Generator().manual_seed(1))
    x = torch.randn(1, cell.lstm.input_size - cell.heads * cell.slot_size)
    with torch.no_grad():
        new, _ = cell([s.clone() for s in state], x)
    old_memory, new_memory = state[2][0], new[2][0]
    untouched = [i for i in range(cell.slots) if i not in (3, 9)]
    torch.testing.assert_close(new_memory[untouched], old_memory[untouched], rtol=0, atol=0)
    written = new_memory[3] - old_memory[3]
    assert written.abs().sum() > 0
    torch.testing.assert_close(new_memory[9], written, rtol=1e-5, atol=1e-6)
    least = torch.zeros(cell.slots)
    least[[3, 9]] = 1.0
    expected_usage = cell.gamma * state[4][0] + new[3][0].sum(0) + cell.heads * least
    torch.testing.assert_close(new[4][0], expected_usage, rtol=1e-5, atol=1e-6)


def test_an_open_gate_writes_where_the_heads_last_read() -> None:
    """Gate open: the write goes to slot 5 (the previous read location); slot 9 is still emptied first."""
    cell = memory_cell(gate_bias=30.0)
    state = some_state(cell, torch.Generator().manual_seed(2))
    x = torch.randn(1, cell.lstm.input_size - cell.heads * cell.slot_size)
    with torch.no_grad():
        new, _ = cell([s.clone() for s in state], x)
    old_memory, new_memory = state[2][0], new[2][0]
    untouched = [i for i in range(cell.slots) if i not in (5, 9)]
    torch.testing.assert_close(new_memory[untouched], old_memory[untouched], rtol=0, atol=0)
    assert (new_memory[5] - old_memory[5]).abs().sum() > 0
    torch.testing.assert_close(new_memory[9], torch.zeros(cell.slot_size), rtol=0, atol=1e-6)


@pytest.mark.parametrize("controller_only", [False, True])
def test_the_sequence_is_causal_and_a_label_arrives_one_step_late(controller_only: bool) -> None:
    """Perturbing image t changes no output before t; perturbing label t changes none before t + 1."""
    method = fresh(controller_only=controller_only, **({"slots": 128, "slot_size": 40, "heads": 4} if controller_only else {}))
    embeddings = torch.randn(2, 10, method.embedding_size)
    labels = torch.randint(0, 5, (2, 10))
    with torch.no_grad():
        base = method.sequence_scores(embeddings, labels, 5)
        image = embeddings.clone()
        image[:, 6] += 1.0
        after_image = method.sequence_scores(image, labels, 5)
        label = labels.clone()
        label[:, 6] = (label[:, 6] + 1) % 5
        after_label = method.sequence_scores(embeddings, label, 5)
    torch.testing.assert_close(after_image[:, :6], base[:, :6], rtol=0, atol=0)
    assert not torch.allclose(after_image[:, 6], base[:, 6])
    torch.testing.assert_close(after_label[:, :7], base[:, :7], rtol=0, atol=0)
    assert not torch.allclose(after_label[:, 7], base[:, 7])


def test_each_query_is_the_step_after_the_support_sequence() -> None:
    method = fresh()
    support, labels, query = random_episode(5, 2, 4)
    with torch.no_grad():
        scores = method(support, labels, query)
        support_emb, query_emb = method.backbone(support), method.backbone(query)
        for j in range(4):
            sequence = torch.cat([support_emb, query_emb[j : j + 1]])[None]
            full = method.sequence_scores(sequence, torch.cat([labels, torch.zeros(1, dtype=torch.long)])[None], 5)
            torch.testing.assert_close(scores[j], full[0, -1], rtol=1e-5, atol=1e-5)


def test_queries_do_not_leak_into_each_other() -> None:
    assert_queries_independent(fresh())


def prototype_sequences(batch: int, way: int, instances: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of ``way`` classes x ``instances``, shuffled: each class a random 64-d prototype, each instance
    the prototype plus a little noise (embeddings of a well-separated data set)."""
    labels = torch.stack([torch.randperm(way * instances, generator=generator) % way for _ in range(batch)])
    prototypes = torch.randn(batch, way, 64, generator=generator)
    embeddings = prototypes.gather(1, labels.unsqueeze(-1).expand(-1, -1, 64))
    return embeddings + 0.1 * torch.randn(embeddings.shape, generator=generator), labels


def test_sequence_training_teaches_the_memory_to_bind_labels() -> None:
    """The paper's protocol on well-separated embeddings (the backbone's job is left out, to keep this short):
    after 400 updates of 16 sequences (3 classes x 4 instances), later presentations of a class are recognised
    far better than the first, which can only be guessed."""
    method = fresh(heads=4, hidden=64, slots=16, slot_size=16).train()
    optimizer = torch.optim.Adam(method.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        embeddings, labels = prototype_sequences(16, 3, 4, generator)
        loss = F.cross_entropy(method.sequence_scores(embeddings, labels, 3).transpose(1, 2), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    embeddings, labels = prototype_sequences(500, 3, 4, generator)
    with torch.no_grad():
        correct = method.sequence_scores(embeddings, labels, 3).argmax(-1) == labels
    onehot = F.one_hot(labels, 3)
    instance = (onehot.cumsum(1) * onehot).sum(-1)
    first, later = correct[instance == 1].float().mean(), correct[instance >= 3].float().mean()
    assert later > first + 0.15, (first, later)


@pytest.fixture(scope="module")
def run(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sequence training end to end (meta_train, 5 classes x 10 instances, meta-batches of 2 sequences)."""
    output = tmp_path_factory.mktemp("runs") / "mann"
    recipe = quick_recipe(synthetic_file, output, method="mann", method_options={**SMALL, "sequence_training": True},
                          shape="5w5s5q", episodes=4, log_every=2, meta_batch=2)
    return trained(recipe)



def test_sequence_training_runs_and_logs_query_accuracy(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["phase"] == "train"]
    assert len(train) == 2 and all(0 < row["loss"] < 3 and 0 <= row["accuracy"] <= 100 for row in train), train
    assert rows[-1]["phase"] == "val"


def test_by_instance_evaluation_through_the_cli(run: Path, tmp_path: Path) -> None:
    """Stored 5w5s5q test episodes give 10 images per class: a 10-row table, the same numbers as the library."""
    out = tmp_path / "by-instance.json"
    result = CliRunner().invoke(main, ["evaluate", str(run), "--shape", "5w5s5q", "--by-instance", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "accuracy by instance" in result.stdout  # the table is the result: on stdout
    payload = json.loads(out.read_text())
    assert list(payload["by_instance"]) == [str(k) for k in range(1, 11)] and payload["sequence_length"] == 50
    method = load_trained(run).method
    with FewShotData(payload["data"]) as data:
        direct = accuracy_by_instance(method, data, "test", EpisodeShape(5, 5, 5))
    assert payload["by_instance"]["1"]["accuracy"] == round(float(direct.accuracies[:, 0].mean() * 100), 4)
    assert all(row["ci95"] >= 0 for row in payload["by_instance"].values())


def test_by_instance_embeds_through_the_runtime_asked_for(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--by-instance --runtime onnx embeds the images with ONNX Runtime: the same table as PyTorch's (predictions
    agree; the scores differ by float rounding), and the JSON says which runtime ran."""
    built: list[str] = []
    for name, make in list(RUNTIMES.items()):
        monkeypatch.setitem(RUNTIMES, name, lambda network, example, name=name, make=make: built.append(name) or make(network, example))
    tables = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / f"{runtime}.json"
        result = CliRunner().invoke(main, ["evaluate", str(run), "--shape", "5w5s5q", "--by-instance", "--runtime", runtime, "--json", str(out)])
        assert result.exit_code == 0, result.output
        payload = json.loads(out.read_text())
        assert payload["runtime"] == runtime
        tables[runtime] = payload["by_instance"]
    assert tables["onnx"] == tables["torch"] and built == ["torch", "onnx"]


def test_by_instance_refuses_other_methods_and_short_episodes(run: Path, synthetic_file: Path) -> None:
    protonet = build_method("protonet", build_backbone("conv4", 1, [0.1], [0.3]), {})
    with FewShotData(synthetic_file) as data, pytest.raises(FsltoolError, match=r"method 'protonet' does not predict along labelled sequences; --by-instance needs 'mann'"):
        accuracy_by_instance(protonet, data, "test", EpisodeShape(5, 5, 5))
    short = CliRunner().invoke(main, ["evaluate", str(run), "--shape", "5w1s5q", "--by-instance"])
    assert short.exit_code == 2 and "5w1s5q episodes have 6 images per class" in short.output


def test_embedding_once_gives_the_per_episode_scores(run: Path, synthetic_file: Path) -> None:
    assert_embedding_once_matches_per_episode(load_trained(run).method, synthetic_file)


def test_export_verifies(exported: tuple[Path, ExportReport]) -> None:
    out, report = exported
    assert {p.name for p in out.iterdir()} == {"embedding.onnx", "embedding.ts", "classifier.onnx", "classifier.ts", "model.json"}
    assert report.verification is not None and report.verification.agreement == 1.0


@pytest.mark.parametrize(("way", "shot", "query"), [(2, 1, 1), (5, 1, 7), (4, 6, 3)])
def test_exported_classifier_has_dynamic_sequence_length(exported: tuple[Path, ExportReport], run: Path, way: int, shot: int, query: int) -> None:
    """The ONNX Scan and the scripted TorchScript loop run support sequences of 2 to 24 steps (traced at 6)."""
    assert_exported_classifier_matches(exported[0], load_trained(run).method, way, shot, query)


def test_controller_only_is_the_lstm_alone() -> None:
    method = fresh(controller_only=True, slots=128, slot_size=40, heads=4)
    assert isinstance(method.unroll.cell, ControllerCell)
    assert method(*random_episode(5, 1, 3)).shape == (3, 5)


def test_more_ways_than_label_slots_is_a_clear_error() -> None:
    with pytest.raises(FsltoolError, match=r"the episode is 6-way but the model has method_options.way = 5 label slots"):
        fresh()(*random_episode(6, 1, 2))


@pytest.mark.parametrize(
    ("backbone", "options", "message"),
    [
        ("conv4", {"way": 1}, r"method_options.way must be at least 2"),
        ("conv4", {"hidden": 0}, r"method_options.hidden must be a positive integer, got 0"),
        ("conv4", {"slots": "128"}, r"method_options.slots must be a positive integer, got '128'"),
        ("conv4", {"heads": 13}, r"method_options.heads \(13\) must not exceed method_options.slots \(12\)"),
        ("conv4", {"gamma": 1.5}, r"method_options.gamma must be a number in \[0, 1\], got 1.5"),
        ("conv4", {"controller_only": "yes"}, r"method_options.controller_only must be true or false, got 'yes'"),
        ("conv4", {"sequence_training": 1}, r"method_options.sequence_training must be true or false, got 1"),
        ("conv4", {"controller_only": True}, r"method_options.slots applies only to the memory, which 'controller_only: true' removes"),
        ("conv4-relation", {}, r"keeps feature maps: use a flattening backbone"),
    ],
)
def test_bad_options_are_named(backbone: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(FsltoolError, match=message):
        fresh(backbone, **options)


@pytest.mark.parametrize("path", [p for p in sorted((REPO / "recipes").rglob("mann-*.yaml")) if p.name != "mann-base.yaml"], ids=lambda p: p.name)
def test_shipped_recipes_build(path: Path) -> None:
    recipe = load_recipe(path)
    method = build_method(recipe.method, build_backbone(recipe.backbone, 1, [0.1], [0.3], **recipe.backbone_options), recipe.method_options)
    assert isinstance(method, MANN) and method.way == EpisodeShape.parse(recipe.train.shape).way
