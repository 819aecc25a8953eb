from __future__ import annotations

import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import CLASS_SORTED, SHUFFLED, EvalResult, episode_accuracies, episode_scores, evaluate, query_batch_scores, rows_into_one, support_orders
from fsltool.methods import Method


def test_confidence_interval_is_1_96_std_over_sqrt_n() -> None:
    accuracies = np.array([0.8, 1.0, 0.9, 0.7, 1.0, 0.6])
    result = EvalResult("test", EpisodeShape(5, 1, 15), accuracies, "stored")
    assert result.accuracy == pytest.approx(83.3333, abs=1e-3)
    assert result.ci95 == pytest.approx(1.96 * accuracies.std(ddof=1) / math.sqrt(6) * 100)
    payload = result.to_json()
    assert {"accuracy", "ci95", "episodes", "way", "shot", "query"} <= payload.keys() and payload["episodes"] == 6


def test_rows_into_one_equals_cat_and_keeps_no_chunk_past_its_iteration() -> None:
    """The allocator-growth fix: each chunk is dead by the time the next one is made (docs/speed.md)."""
    sizes, made, alive_when_next_made = [3, 1, 4, 2], [], []

    def chunks():
        for i, rows in enumerate(sizes):
            alive_when_next_made.append([ref() is not None for ref in made])
            chunk = torch.arange(rows * 2, dtype=torch.float32).view(rows, 2) + 10 * i
            made.append(weakref.ref(chunk))
            yield chunk
            del chunk

    expected = torch.cat([torch.arange(r * 2, dtype=torch.float32).view(r, 2) + 10 * i for i, r in enumerate(sizes)])
    assert torch.equal(rows_into_one(chunks(), sum(sizes)), expected)
    assert not any(any(alive) for alive in alive_when_next_made)


def test_embedding_once_per_image_matches_episode_by_episode(trained_run: Path, synthetic_file: Path) -> None:
    method = load_trained(trained_run).method
    shape = EpisodeShape(5, 5, 5)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        fast = episode_accuracies(method, data, shape, support, query)
        slow = []
        for s, q in zip(support, query):
            episode = data.episode(s, q, shape)
            with torch.inference_mode():
                scores = method(episode.support, episode.support_labels, episode.query)
            slow.append((scores.argmax(-1) == episode.query_labels).float().mean().item())
    np.testing.assert_allclose(fast, slow)
    assert len(fast) == 30


def test_stored_subset_and_sampled_episodes(trained_run: Path, synthetic_file: Path) -> None:
    method = load_trained(trained_run).method
    shape = EpisodeShape(5, 1, 5)
    with FewShotData(synthetic_file) as data:
        assert len(evaluate(method, data, "test", shape, episodes=7).accuracies) == 7
        a = evaluate(method, data, "test", EpisodeShape(3, 2, 3), episodes=12, sample_seed=4)
        b = evaluate(method, data, "test", EpisodeShape(3, 2, 3), episodes=12, sample_seed=4)
        np.testing.assert_array_equal(a.accuracies, b.accuracies)
        assert a.episodes_from == "sampled (seed 4)"
        with pytest.raises(FsltoolError, match=r"no stored test episodes of shape 20w1s15q \(stored: 5w1s5q, 5w5s5q\)"):
            evaluate(method, data, "test", EpisodeShape(20, 1, 15))
        with pytest.raises(FsltoolError, match="unknown split 'tset'"):
            evaluate(method, data, "tset", shape, sample_seed=1)


def test_frozen_inference_copy_matches_eager_embeddings(trained_run: Path, synthetic_file: Path) -> None:
    from fsltool.evaluate import embed_all

    method = load_trained(trained_run).method
    indices = np.arange(0, 300, 7)
    with FewShotData(synthetic_file) as data:
        frozen = embed_all(method, data, indices)
        eager = embed_all(method, data, indices, frozen=False)
    assert frozen.shape == eager.shape == (len(indices), 64)
    torch.testing.assert_close(frozen, eager, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- support order


class RecordingSequenceStub(Method):
    """An order-sensitive method that records the support (pixels as embeddings) and labels evaluation shows it."""

    name = "recording-stub"
    order_sensitive = True
    embeds_independently = True

    def __init__(self) -> None:
        super().__init__(nn.Flatten())  # type: ignore[arg-type]
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __deepcopy__(self, memo: dict[int, object]) -> "RecordingSequenceStub":
        """--transductive scores on a copy: the copy records into the same list."""
        twin = RecordingSequenceStub()
        twin.embeds_independently, twin.seen = self.embeds_independently, self.seen
        return twin

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        self.seen.append((support.flatten(1), support_labels.clone()))
        return torch.zeros(len(query), int(support_labels.max()) + 1)

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int
    ) -> torch.Tensor:
        self.seen.extend(zip(support.clone(), support_labels.clone()))
        return torch.zeros(*query.shape[:2], way)


def test_support_orders_are_seeded_per_episode() -> None:
    orders = support_orders(np.arange(40), 25)
    np.testing.assert_array_equal(orders, support_orders(np.arange(40), 25))
    np.testing.assert_array_equal(orders[:7], support_orders(np.arange(7), 25))  # no dependence on the set's size
    assert (np.sort(orders, 1) == np.arange(25)).all() and len({tuple(order) for order in orders}) == 40
    np.testing.assert_array_equal(orders[3], np.random.default_rng(np.random.SeedSequence([0, 3])).permutation(25))
    assert support_orders(np.arange(2), 10).tolist() == [[4, 6, 2, 7, 3, 5, 9, 0, 8, 1], [9, 1, 3, 8, 7, 6, 0, 4, 2, 5]]


def test_sequence_methods_see_the_seeded_shuffled_support(synthetic_file: Path) -> None:
    """All three evaluation paths (embeddings, whole episodes, --transductive) show an order-sensitive method the
    same non-sorted orders, run after run, with every support image still carrying its own class's label."""
    shape = EpisodeShape(5, 5, 5)
    runs = []
    with FewShotData(synthetic_file) as data:
        support, _ = data.stored_episodes("test", shape)
        for embeds_independently, transductive in ((True, False), (True, False), (False, False), (True, True)):
            stub = RecordingSequenceStub()
            stub.embeds_independently = embeds_independently
            result = evaluate(stub, data, "test", shape, query_batch_statistics=transductive)
            assert result.support_order == SHUFFLED and result.to_json()["support_order"] == "shuffled (seeded per episode)"
            runs.append(stub.seen)
        stored_pixels = [data.images(episode).flatten(1) for episode in support]
    class_order = torch.arange(5).repeat_interleave(5)
    for run in runs[1:]:
        for (pixels, labels), (first_pixels, first_labels) in zip(run, runs[0], strict=True):
            assert torch.equal(labels, first_labels) and torch.equal(pixels, first_pixels)
    assert len(runs[0]) == len(support) == 30
    assert sum(not torch.equal(labels, class_order) for _, labels in runs[0]) == 30
    for (pixels, labels), stored in zip(runs[0], stored_pixels):
        assert torch.equal(labels.sort().values, class_order)
        for position, label in enumerate(labels.tolist()):  # the image at each position is one of its class's shots
            assert any(torch.equal(pixels[position], stored[j]) for j in range(5 * label, 5 * label + 5))


def test_protonet_scores_do_not_depend_on_the_support_order(
    trained_run: Path, synthetic_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ProtoNet is evaluated class-sorted; shown the shuffled order (images and labels permuted together) it gives
    the same scores, on both evaluation paths."""
    method = load_trained(trained_run).method
    assert not method.order_sensitive
    shape = EpisodeShape(5, 5, 5)
    recorded: list[torch.Tensor] = []
    original = method.scores_from_embeddings

    def recording(*args: object) -> torch.Tensor:
        recorded.append(original(*args))  # type: ignore[arg-type]
        return recorded[-1]

    monkeypatch.setattr(method, "scores_from_embeddings", recording)
    with FewShotData(synthetic_file) as data:
        in_class_order = evaluate(method, data, "test", shape)
        calls = len(recorded)
        method.order_sensitive = True  # type: ignore[misc]
        shuffled = evaluate(method, data, "test", shape)
        method.embeds_independently = False  # the episode-by-episode path
        shuffled_slow = episode_accuracies(method, data, shape, *data.stored_episodes("test", shape))
    assert in_class_order.support_order == CLASS_SORTED and shuffled.support_order == SHUFFLED
    torch.testing.assert_close(torch.cat(recorded[calls : 2 * calls]), torch.cat(recorded[:calls]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(shuffled.accuracies, in_class_order.accuracies)
    np.testing.assert_array_equal(shuffled_slow, in_class_order.accuracies)


def test_evaluate_runs_at_the_precision_the_run_validated_at(synthetic_file: Path, tmp_path: Path) -> None:
    import json

    from fsltool.train import meta_train
    from tests.conftest import quick_recipe, run_cli

    recipe = quick_recipe(synthetic_file, tmp_path / "bf16", episodes=2)
    recipe.precision = "bf16"
    meta_train(recipe, quiet=True)
    code, out, err = run_cli("evaluate", str(tmp_path / "bf16"), "--episodes", "5", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["precision"] == "bf16"


# ---------------------------------------------------------------- --runtime onnx


def test_onnx_runtime_gives_the_torch_scores_to_float_rounding(
    trained_run: Path, synthetic_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every query's scores on every stored episode agree with PyTorch's (the embeddings come from ONNX Runtime,
    the scoring is the method's own), so the predictions and accuracies are the same; the result says which ran."""
    from fsltool.evaluate import episode_scores
    from fsltool.runtime import OnnxModel

    onnx_calls = []
    original_run = OnnxModel.run
    monkeypatch.setattr(OnnxModel, "run", lambda self, feeds: onnx_calls.append(1) or original_run(self, feeds))
    method = load_trained(trained_run).method
    shape = EpisodeShape(5, 5, 5)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        torch_scores = episode_scores(method, data, shape, support, query, "torch")
        onnx_scores = episode_scores(method, data, shape, support, query, "onnx")
        assert onnx_calls  # the images went through ONNX Runtime
        result = evaluate(method, data, "test", shape, runtime="onnx")
        torch_result = evaluate(method, data, "test", shape)
    assert onnx_scores.shape == (30, 25, 5)
    torch.testing.assert_close(onnx_scores, torch_scores, rtol=1e-4, atol=1e-4 * float(torch_scores.abs().max()))
    torch.testing.assert_close(onnx_scores.argmax(-1), torch_scores.argmax(-1))
    assert result.runtime == "onnx" and result.to_json()["runtime"] == "onnx"
    np.testing.assert_array_equal(result.accuracies, torch_result.accuracies)
    assert torch_result.runtime == "torch"


def test_onnx_runtime_refuses_what_it_cannot_run_exactly(trained_run: Path, synthetic_file: Path) -> None:
    from fsltool.methods import build_method
    from fsltool.models import build_backbone

    method = load_trained(trained_run).method
    reptile = build_method("reptile", build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=4), {"way": 5})
    shape = EpisodeShape(5, 1, 5)
    with FewShotData(synthetic_file) as data:
        with pytest.raises(FsltoolError, match=r"--runtime onnx: method 'reptile' does not embed each image once"):
            evaluate(reptile, data, "test", shape, runtime="onnx")
        with pytest.raises(FsltoolError, match=r"runtime must be one of torch, onnx, got 'tvm'"):
            evaluate(method, data, "test", shape, runtime="tvm")
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(FsltoolError, match=r"--runtime onnx runs the float32 graph.*bf16"):
            evaluate(method, data, "test", shape, runtime="onnx")


def test_evaluate_cli_runtime_option(trained_run: Path) -> None:
    import json

    from tests.conftest import run_cli

    code, out, err = run_cli("evaluate", str(trained_run), "--episodes", "8", "--runtime", "onnx", "--json", "-")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["runtime"] == "onnx" and payload["episodes"] == 8
    code, _, err = run_cli("evaluate", str(trained_run), "--runtime", "tvm")
    assert code == 2 and "'tvm' is not one of 'torch', 'onnx'" in err


def test_sessions_spin_unless_told_not_to() -> None:
    """Evaluation's ONNX Runtime copy is built with spinning=False (PyTorch works between its calls); other sessions
    keep ONNX Runtime's default (spinning, for the lowest latency of back-to-back predictions)."""
    import onnx
    from onnx import TensorProto, helper

    from fsltool.runtime import create_session

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    entry = "session.intra_op.allow_spinning"
    assert create_session(model, "cpu", spinning=False).get_session_options().get_session_config_entry(entry) == "0"
    with pytest.raises(Exception):  # never set: ONNX Runtime's default applies
        create_session(model, "cpu").get_session_options().get_session_config_entry(entry)
    onnx.checker.check_model(onnx.load_from_string(model))


def test_transductive_protocol_normalises_support_and_query_batches_apart(trained_run: Path, synthetic_file: Path) -> None:
    """--transductive: support set and query batch each through BatchNorm with their own batch statistics; a query's
    score then depends on the other queries, and the model's running statistics stay as they were."""
    import copy

    method = load_trained(trained_run).method
    running = {name: buffer.clone() for name, buffer in method.named_buffers()}
    shape = EpisodeShape(5, 1, 5)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        support, query = support[:4], query[:4]
        got = query_batch_scores(method, data, shape, support, query)
        expected = []
        reference = copy.deepcopy(method).train()  # every BatchNorm on batch statistics
        with torch.no_grad():
            for s, q in zip(support, query):
                episode = data.episode(s, q, shape)
                prototypes = reference.backbone(episode.support).view(5, 1, -1).mean(1)
                expected.append(-torch.cdist(reference.backbone(episode.query), prototypes).pow(2))
        torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, episode_scores(method, data, shape, support, query), atol=1e-3)
        # the first query's score moves when the last query is another image: the protocol is transductive
        changed = query.copy()
        changed[:, -1] = support[:, 0]
        assert not torch.allclose(query_batch_scores(method, data, shape, support, changed)[:, 0], got[:, 0])
        result = evaluate(method, data, "test", shape, episodes=4, query_batch_statistics=True)
        assert result.transductive and result.to_json()["transductive"] is True
        assert not evaluate(method, data, "test", shape, episodes=4).transductive
    for name, buffer in method.named_buffers():
        assert torch.equal(buffer, running[name]), name


@pytest.mark.parametrize("name, options", [
    ("reptile", {"test_inner_steps": 2, "per_query_bn": True}),
    ("maml", {"inner_steps": 1, "test_inner_steps": 2}),
])
def test_transductive_protocol_runs_the_adapting_methods_own_mode(synthetic_file: Path, name: str, options: dict) -> None:
    """MAML and Reptile under --transductive score as the same weights built with transductive_bn: true (Reptile:
    without per_query_bn), on a copy: the method's own options stay."""
    from fsltool.methods import build_method
    from fsltool.models import build_backbone

    def built(**extra: object) -> Method:
        torch.manual_seed(0)
        return build_method(name, build_backbone("conv4-strided", 1, [0.1], [0.3], hidden=4), {"way": 5, **options, **extra})

    method = built()
    reference = built(transductive_bn=True, per_query_bn=False) if name == "reptile" else built(transductive_bn=True)
    reference.load_state_dict(method.state_dict())
    shape = EpisodeShape(5, 1, 5)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        support, query = support[:3], query[:3]
        got = query_batch_scores(method, data, shape, support, query)
        torch.testing.assert_close(got, episode_scores(reference, data, shape, support, query))
        assert not torch.allclose(got, episode_scores(method, data, shape, support, query), atol=1e-4)
        assert evaluate(method, data, "test", shape, episodes=3, query_batch_statistics=True).transductive
    assert not method.transductive and getattr(method, "per_query_bn", True)


def test_transductive_protocol_refuses_what_it_cannot_run(trained_run: Path, synthetic_file: Path) -> None:
    from fsltool.methods import build_method
    from fsltool.models import build_backbone

    from tests.conftest import run_cli

    fce = build_method("matchingnet", build_backbone("conv4", 1, [0.1], [0.3], hidden=4), {"fce": True})
    with FewShotData(synthetic_file) as data:
        with pytest.raises(FsltoolError, match=r"--transductive: method 'matchingnet' neither embeds each image on its own nor has a transductive"):
            evaluate(fce, data, "test", EpisodeShape(5, 1, 5), query_batch_statistics=True)
    code, _, err = run_cli("evaluate", str(trained_run), "--transductive", "--runtime", "onnx")
    assert code == 2 and "--transductive embeds with batch statistics in PyTorch: it does not go with --runtime onnx" in err
    code, _, err = run_cli("evaluate", str(trained_run), "--transductive", "--calibration")
    assert code == 2 and "--transductive reports accuracy only" in err
    code, out, err = run_cli("evaluate", str(trained_run), "--transductive", "--episodes", "3")
    assert code == 0 and "3 stored test episodes, transductive)" in out, err


def test_adapt_steps_sets_the_fine_tuning_steps_at_evaluation(synthetic_file: Path, tmp_path: Path) -> None:
    """--adapt-steps N scores as the same weights built with test_inner_steps: N, and is recorded; a method that
    does not fine-tune, or MAML++'s per-step layers beyond the steps trained, are refused."""
    import json

    from fsltool.checkpoint import build_model, with_adapt_steps
    from tests.conftest import quick_recipe, run_cli, trained

    recipe = quick_recipe(synthetic_file, tmp_path / "maml", method="maml", backbone="conv4-strided", shape="5w1s5q", episodes=2,
                          method_options={"way": 5, "inner_steps": 1, "test_inner_steps": 1})
    run = trained(recipe)
    model = load_trained(run)
    adapted = with_adapt_steps(model.method, model.config, 3)
    reference = build_model({**model.config, "method_options": {**model.config["method_options"], "test_inner_steps": 3}}).eval()
    reference.load_state_dict(model.method.state_dict())
    shape = EpisodeShape(5, 1, 5)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        got = episode_scores(adapted, data, shape, support[:3], query[:3])
        torch.testing.assert_close(got, episode_scores(reference, data, shape, support[:3], query[:3]), rtol=0, atol=0)
        assert not torch.allclose(got, episode_scores(model.method, data, shape, support[:3], query[:3]), atol=1e-4)
    assert model.method.test_inner_steps == 1  # the loaded method is left as it was

    code, out, err = run_cli("evaluate", str(run), "--episodes", "3", "--adapt-steps", "3", "--json", str(tmp_path / "r.json"))
    assert code == 0 and "3 stored test episodes, non-transductive, 3 fine-tuning steps)" in out, err
    assert json.loads((tmp_path / "r.json").read_text())["adapt_steps"] == 3
    code, _, err = run_cli("evaluate", str(run), "--adapt-steps", "0")
    assert code == 2 and "--adapt-steps" in err

    plus_plus = {**model.config, "method_options": {"way": 5, "inner_steps": 1, "test_inner_steps": 1, "per_step_bn": True}}
    with pytest.raises(FsltoolError, match=r"--adapt-steps 2: .*test_inner_steps"):
        with_adapt_steps(build_model(plus_plus), plus_plus, 2)


def test_adapt_steps_refuses_a_method_that_does_not_fine_tune(trained_run: Path) -> None:
    from tests.conftest import run_cli

    code, _, err = run_cli("evaluate", str(trained_run), "--adapt-steps", "5")
    assert code == 2 and "--adapt-steps: method 'protonet' does not fine-tune on the support set at evaluation" in err
