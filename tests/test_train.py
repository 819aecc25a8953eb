from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fsltool.checkpoint import build_model, load_checkpoint, load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import evaluate
from fsltool.methods.base import StepOutput
from fsltool.train import meta_train
from tests.conftest import assert_resume_from_episode_4_is_exact, quick_recipe


def test_meta_training_raises_test_accuracy_over_the_untrained_network(synthetic_file: Path, tmp_path: Path) -> None:
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=60, log_every=10)
    recipe.validation.every = 60
    meta_train(recipe, quiet=True)
    trained = load_trained(tmp_path / "run", "last")
    torch.manual_seed(recipe.seed)
    untrained = build_model(trained.config).eval()
    with FewShotData(synthetic_file) as data:
        before = evaluate(untrained, data, "test", EpisodeShape(5, 1, 5))
        after = evaluate(trained.method, data, "test", EpisodeShape(5, 1, 5))
    assert after.accuracy > before.accuracy + 10, (before.accuracy, after.accuracy)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["phase"] == "train"]
    assert losses[-1] < losses[0]


def parameters(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_resume_ends_with_exactly_the_parameters_of_an_uninterrupted_run(synthetic_file: Path, tmp_path: Path) -> None:
    meta_train(quick_recipe(synthetic_file, tmp_path / "straight", episodes=8, lr_step=3), quiet=True)
    meta_train(quick_recipe(synthetic_file, tmp_path / "resumed", episodes=4, lr_step=3), quiet=True)
    meta_train(quick_recipe(synthetic_file, tmp_path / "resumed", episodes=8, lr_step=3), quiet=True, resume=True)
    straight, resumed = parameters(tmp_path / "straight"), parameters(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    rows = [json.loads(line)["episode"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [json.loads(line)["episode"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]


def test_existing_run_is_never_overwritten_silently(synthetic_file: Path, tmp_path: Path) -> None:
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=4)
    meta_train(recipe, quiet=True)
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(FsltoolError, match="already holds a trained run"):
        meta_train(recipe, quiet=True)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before
    with pytest.raises(FsltoolError, match="the recipe differs from the one this run was started with .*key 'train.lr' is 0.5 here but was "):
        meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=8, lr=0.5), quiet=True, resume=True)
    with pytest.raises(FsltoolError, match="nothing to resume"):
        meta_train(quick_recipe(synthetic_file, tmp_path / "other"), quiet=True, resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsltool.methods.protonet import ProtoNet

    original = ProtoNet.step
    calls = {"n": 0}

    def step(self: ProtoNet, episode: object) -> StepOutput:
        calls["n"] += 1
        output = original(self, episode)  # type: ignore[arg-type]
        return StepOutput(output.loss * float("nan"), output.scores) if calls["n"] == 6 else output

    monkeypatch.setattr(ProtoNet, "step", step)
    with pytest.raises(FsltoolError, match="episode 6: loss is nan"):
        meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=8), quiet=True)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["episode"] == 4


def test_training_shape_the_split_cannot_supply_is_refused(synthetic_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match=r"split 'train' has \d+ classes, fewer than the 500 ways"):
        meta_train(quick_recipe(synthetic_file, tmp_path / "run", shape="500w1s1q"), quiet=True)
    assert not (tmp_path / "run").exists()


def test_meta_batch_averages_episodes_into_one_update(synthetic_file: Path, tmp_path: Path) -> None:
    """meta_batch=2 over 4 updates consumes the sampler like 8 single-episode updates but takes 4 optimizer steps."""
    meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=4, meta_batch=2, lr_step=1, lr_gamma=0.5), quiet=True)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["episode"] == 4
    assert state["scheduler"]["last_epoch"] == 4 and state["optimizer"]["state"][0]["step"].item() == 4


def nan_at_call(monkeypatch: pytest.MonkeyPatch, bad: int) -> None:
    """ProtoNet's ``bad``-th training step returns a NaN loss."""
    from fsltool.methods.protonet import ProtoNet

    original = ProtoNet.step
    calls = {"n": 0}

    def step(self: ProtoNet, episode: object) -> StepOutput:
        calls["n"] += 1
        output = original(self, episode)  # type: ignore[arg-type]
        return StepOutput(output.loss * float("nan"), output.scores) if calls["n"] == bad else output

    monkeypatch.setattr(ProtoNet, "step", step)


def test_the_log_scores_the_queries_a_method_names(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A method may score only some queries for the log (StepOutput.labels, Reptile does): the training accuracy
    counts those, against their labels. Here one query a step, labelled with its own best score: 100%."""
    from fsltool.methods.protonet import ProtoNet

    original = ProtoNet.step

    def step(self: ProtoNet, episode: object) -> StepOutput:
        output = original(self, episode)  # type: ignore[arg-type]
        return StepOutput(output.loss, output.scores[:1], output.scores[:1].argmax(-1))

    monkeypatch.setattr(ProtoNet, "step", step)
    meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=4), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["accuracy"] for row in rows if row["phase"] == "train"] == [100.0, 100.0]


def test_skip_drops_non_finite_meta_steps_and_counts_them(
    synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nan_at_call(monkeypatch, 6)
    result = meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=8, on_nonfinite="skip"), quiet=True)
    assert result.skipped_nonfinite == 1
    assert "skipped 1 meta-steps whose loss was not finite" in capsys.readouterr().err
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["episode"] == 8 and state["skipped_nonfinite"] == 1
    assert state["optimizer"]["state"][0]["step"].item() == 7  # no optimizer step for the dropped meta-step
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["skipped_nonfinite"] for row in rows if row["phase"] == "train"] == [0, 0, 1, 1]


def test_resuming_a_run_stopped_by_a_non_finite_loss_with_skip(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nan_at_call(monkeypatch, 6)
    with pytest.raises(FsltoolError, match="episode 6: loss is nan.*on_nonfinite=skip"):
        meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=8), quiet=True)
    nan_at_call(monkeypatch, 2)  # the resumed process's 2nd step is episode 6 again
    result = meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=8, on_nonfinite="skip"), quiet=True, resume=True)
    assert result.skipped_nonfinite == 1


def test_the_last_numbered_checkpoints_are_kept(synthetic_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    meta_train(quick_recipe(synthetic_file, run, episodes=12, keep_checkpoints=2), quiet=True)  # validates every 4
    numbered = sorted(path.name for path in (run / "checkpoints").glob("episode-*.pt"))
    assert numbered == ["episode-00000008.pt", "episode-00000012.pt"]
    assert load_checkpoint(run / "checkpoints" / numbered[0])["episode"] == 8
    meta_train(quick_recipe(synthetic_file, run, episodes=16, keep_checkpoints=2), quiet=True, resume=True)
    assert sorted(path.name for path in (run / "checkpoints").glob("episode-*.pt")) == ["episode-00000012.pt", "episode-00000016.pt"]
    meta_train(quick_recipe(synthetic_file, run, episodes=4, keep_checkpoints=0), quiet=True, force=True)
    assert not list((run / "checkpoints").glob("episode-*.pt"))  # --force starts over: old numbered ones go too


def test_prefetch_changes_nothing(synthetic_file: Path, tmp_path: Path) -> None:
    """The background thread assembles the same episodes in the same order, and checkpoints the sampler state before
    a meta-batch it prefetched, so a resumed prefetching run matches an uninterrupted one without prefetch."""
    meta_train(quick_recipe(synthetic_file, tmp_path / "plain", episodes=8, meta_batch=2, prefetch=False), quiet=True)
    recipe = quick_recipe(synthetic_file, tmp_path / "prefetched", episodes=8, meta_batch=2, prefetch=True)
    meta_train(recipe, quiet=True)
    checkpoints = tmp_path / "prefetched" / "checkpoints"  # resume from episode 4, written while episode 5 was prefetched
    (checkpoints / "last.pt").write_bytes((checkpoints / "episode-00000004.pt").read_bytes())
    meta_train(recipe, quiet=True, resume=True)
    plain, prefetched = parameters(tmp_path / "plain"), parameters(tmp_path / "prefetched")
    for key in plain:
        assert torch.equal(plain[key], prefetched[key]), key


def test_linear_schedule_falls_to_zero_and_resumes_exactly(synthetic_file: Path, tmp_path: Path) -> None:
    """train.lr_schedule=linear (Reptile's annealing): the lr after episode e of E is lr * (1 - e / E), 0 at the end;
    a run resumed from its episode-4 checkpoint ends with exactly the parameters of the uninterrupted run."""
    meta_train(quick_recipe(synthetic_file, tmp_path / "straight", episodes=8, log_every=1, lr=0.01, lr_schedule="linear"), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows if row["phase"] == "train"] == pytest.approx([0.01 * (1 - e / 8) for e in range(1, 9)], abs=1e-12)
    recipe = quick_recipe(synthetic_file, tmp_path / "resumed", episodes=8, lr=0.01, lr_schedule="linear", keep_checkpoints=2)
    assert_resume_from_episode_4_is_exact(recipe, tmp_path / "straight")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]["lr"] == 0.0


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_cosine_schedule_with_warmup_and_clipping_resumes_exactly(synthetic_file: Path, tmp_path: Path, optimizer: str) -> None:
    """lr_schedule=cosine with train.warmup: after episode e of E the lr is lr * min(1, (e + 1) / W) *
    (1 + cos(pi e / E)) / 2; with clip_grad_norm and weight decay a run resumed from episode 4 ends with exactly
    the parameters of the uninterrupted run."""
    settings = dict(episodes=8, lr=0.01, lr_schedule="cosine", warmup=3, clip_grad_norm=0.5, weight_decay=0.01, optimizer=optimizer)
    meta_train(quick_recipe(synthetic_file, tmp_path / "straight", log_every=1, **settings), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    expected = [0.01 * min(1, (e + 1) / 3) * (1 + math.cos(math.pi * e / 8)) / 2 for e in range(1, 9)]
    assert [row["lr"] for row in rows if row["phase"] == "train"] == pytest.approx(expected, abs=1e-12)
    assert_resume_from_episode_4_is_exact(quick_recipe(synthetic_file, tmp_path / "resumed", keep_checkpoints=2, **settings), tmp_path / "straight")


def test_clipping_bounds_the_update(synthetic_file: Path, tmp_path: Path) -> None:
    """With plain SGD (no momentum) at lr 1 and clip_grad_norm c, one meta-step moves the parameters by at most c."""
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=1, optimizer="sgd", momentum=0.0, lr=1.0, clip_grad_norm=0.01, log_every=1)
    meta_train(recipe, quiet=True)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    torch.manual_seed(recipe.seed)
    initial = build_model(state["model_config"]).state_dict()
    moved = sum(float((state["model"][k].double() - initial[k].double()).pow(2).sum()) for k, v in initial.items() if v.is_floating_point()
                and "running" not in k)
    assert 0 < math.sqrt(moved) <= 0.01 + 1e-6


def test_value_clipping_bounds_every_element_of_the_update(synthetic_file: Path, tmp_path: Path) -> None:
    """With plain SGD (no momentum) at lr 1 and clip_grad_value v (MAML's miniImageNet code clips at 10), one
    meta-step moves no parameter element by more than v, and some by exactly v: the raw gradient exceeds it."""
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=1, optimizer="sgd", momentum=0.0, lr=1.0, clip_grad_value=1e-4, log_every=1)
    meta_train(recipe, quiet=True)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    torch.manual_seed(recipe.seed)
    initial = build_model(state["model_config"]).state_dict()
    steps = torch.cat([(state["model"][k].double() - initial[k].double()).abs().flatten() for k, v in initial.items()
                       if v.is_floating_point() and "running" not in k])
    assert float(steps.max()) == pytest.approx(1e-4, rel=1e-3)
    assert int((steps > 0.99e-4).sum()) > 1


def nan_gradient_at_call(monkeypatch: pytest.MonkeyPatch, bad: int) -> None:
    """ProtoNet's ``bad``-th training step has a finite loss, but its backward pass makes one parameter's gradient
    NaN (a hook on the parameter)."""
    from fsltool.methods.protonet import ProtoNet

    original = ProtoNet.step
    calls: dict[str, Any] = {"n": 0, "hook": None}

    def step(self: ProtoNet, episode: object) -> StepOutput:
        calls["n"] += 1
        if calls["hook"] is not None:
            calls["hook"].remove()
            calls["hook"] = None
        output = original(self, episode)  # type: ignore[arg-type]
        if calls["n"] == bad:
            assert torch.isfinite(output.loss)
            calls["hook"] = next(self.parameters()).register_hook(lambda grad: grad * float("nan"))
        return output

    monkeypatch.setattr(ProtoNet, "step", step)


def test_a_nan_gradient_with_a_finite_loss_stops_before_the_optimizer_step(synthetic_file: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    nan_gradient_at_call(monkeypatch, 6)
    with pytest.raises(FsltoolError, match=r"episode 6: the gradient is not finite \(loss \d+\.\d+\); stopped .*on_nonfinite=skip"):
        meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=8), quiet=True)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["episode"] == 4


def test_skip_drops_a_meta_step_with_a_nan_gradient(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nan_gradient_at_call(monkeypatch, 6)
    result = meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=8, on_nonfinite="skip"), quiet=True)
    assert result.skipped_nonfinite == 1
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["optimizer"]["state"][0]["step"].item() == 7  # no optimizer step for the dropped meta-step
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")  # what reads a tensor's values back


@contextlib.contextmanager
def counting_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Count the reads of tensor values on the training thread once training has begun (the first RunningStats
    taken), except during validation and checkpointing. On a GPU each is a host-device synchronisation; here on the
    CPU they are counted instead. Data sampling runs on the prefetch thread and is not counted."""
    import threading

    from fsltool.distributed import RunningStats
    from fsltool.loop import Validator

    state = {"reads": 0, "on": False}
    main = threading.main_thread()

    def counted(name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any) -> Any:
            if state["on"] and threading.current_thread() is main:
                state["reads"] += 1
            return original(self, *args)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    taking, validating = RunningStats.of.__func__, Validator.__call__  # type: ignore[attr-defined]

    def take(cls: type[RunningStats], network: torch.nn.Module) -> RunningStats:
        state["on"] = True
        return taking(cls, network)

    def validate(self: Validator, *args: Any) -> str:
        state["on"] = False
        try:
            return validating(self, *args)
        finally:
            state["on"] = True

    monkeypatch.setattr(RunningStats, "of", classmethod(take))
    monkeypatch.setattr(Validator, "__call__", validate)
    yield state


def test_a_meta_step_reads_the_device_once_and_a_log_row_once(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most one host-device synchronisation per meta-step (the non-finite check) plus one per log row. SGD: Adam's
    step counters are CPU tensors, read on the host by design."""
    with counting_host_reads(monkeypatch) as state:
        meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=12, meta_batch=2, log_every=4, optimizer="sgd",
                                clip_grad_norm=1.0), quiet=True)
    assert 0 < state["reads"] <= 12 + 3, state


def test_a_pretraining_step_reads_the_device_once_and_a_log_row_once(synthetic_file: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fsltool.pretrain import pretrain
    from tests.test_pretrain import pretrain_recipe

    recipe = pretrain_recipe(synthetic_file, tmp_path / "run", epochs=1, micro_batches=2, rotation_weight=0.5, optimizer="sgd")
    with counting_host_reads(monkeypatch) as state:
        result = pretrain(recipe, quiet=True)
    rows = sum(1 for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in line)
    assert 0 < state["reads"] <= result.steps + rows, (state, result.steps, rows)


def conv_output_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, torch.dtype]]:
    """(gradients on: a training step, else evaluation; output dtype) of every convolution run from the first
    training step on (building a network runs it once to size its layers)."""
    seen: list[tuple[bool, torch.dtype]] = []
    original = torch.nn.functional.conv2d

    def conv2d(*args: Any, **kwargs: Any) -> torch.Tensor:
        output = original(*args, **kwargs)
        if seen or torch.is_grad_enabled():
            seen.append((torch.is_grad_enabled(), output.dtype))
        return output

    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)  # nn.Conv2d and MAML's batched tasks both call it
    return seen


def test_bf16_runs_training_steps_and_validation_in_bfloat16_and_keeps_fp32_weights(synthetic_file: Path, tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen = conv_output_dtypes(monkeypatch)
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=4, clip_grad_norm=1.0)
    recipe.precision = "bf16"
    result = meta_train(recipe, quiet=True)
    assert {dtype for _, dtype in seen} == {torch.bfloat16} and {training for training, _ in seen} == {True, False}
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(value.dtype == torch.float32 and torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())
    assert result.best_accuracy > 20  # 5-way: above chance
    seen.clear()
    meta_train(quick_recipe(synthetic_file, tmp_path / "fp32", episodes=1), quiet=True)
    assert {dtype for _, dtype in seen} == {torch.float32}


@pytest.mark.parametrize(("first_order", "training_dtype"), [(False, torch.float32), (True, torch.bfloat16)])
def test_bf16_keeps_second_order_maml_steps_in_fp32(first_order: bool, training_dtype: torch.dtype, synthetic_file: Path,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = conv_output_dtypes(monkeypatch)
    recipe = quick_recipe(synthetic_file, tmp_path / "run", method="maml", episodes=1, shape="5w1s5q", lr=0.01,
                          method_options={"way": 5, "inner_steps": 1, "test_inner_steps": 1, "first_order": first_order})
    recipe.precision, recipe.validation.every, recipe.validation.episodes = "bf16", 1, 2
    meta_train(recipe, quiet=True)
    assert seen[0] == (True, training_dtype)  # the training step
    assert seen[-1][1] == torch.bfloat16  # validation (test-time adaptation included) runs in bfloat16


def test_an_unknown_precision_is_one_clear_error(synthetic_file: Path, tmp_path: Path) -> None:
    from fsltool.recipe import validate

    recipe = quick_recipe(synthetic_file, tmp_path / "run")
    recipe.precision = "fp16"
    with pytest.raises(FsltoolError, match="recipe key 'precision': 'fp16' is not one of fp32, bf16"):
        validate(recipe)


def test_bf16_pretraining_steps_run_in_bfloat16(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsltool.pretrain import pretrain
    from tests.test_pretrain import pretrain_recipe

    seen = conv_output_dtypes(monkeypatch)
    recipe = pretrain_recipe(synthetic_file, tmp_path / "run", epochs=1)
    recipe.precision = "bf16"
    pretrain(recipe, quiet=True)
    assert {dtype for _, dtype in seen} == {torch.bfloat16} and {training for training, _ in seen} == {True, False}


def test_a_range_of_shots_trains_and_resumes_exactly(synthetic_file: Path, tmp_path: Path) -> None:
    """train.shape 5w1-4s3q: a shot drawn per meta-batch (SNAIL's protocol); resume stays exact."""
    settings = {"shape": "5w1-4s3q", "meta_batch": 2, "keep_checkpoints": 3, "lr_step": 3}
    meta_train(quick_recipe(synthetic_file, tmp_path / "straight", **settings), quiet=True)
    assert_resume_from_episode_4_is_exact(quick_recipe(synthetic_file, tmp_path / "resumed", **settings), tmp_path / "straight")


@pytest.mark.parametrize(("method", "backbone", "options"), [
    ("protonet", "conv4", {}),
    ("matchingnet", "conv4", {"fce": True}),
    ("relationnet", "conv4-relation", {}),
    ("maml", "conv4", {"way": 5, "inner_steps": 1}),
    ("reptile", "conv4", {"way": 5, "inner_steps": 2}),
    ("snail", "conv4", {"way": 5, "sequence_length": 16, "tc_filters": 8, "attention": [[8, 4], [8, 8], [16, 8]], "batch_norm_over": "meta_batch"}),
    ("mann", "conv4", {"way": 5, "hidden": 16, "slots": 8, "slot_size": 4, "heads": 1}),
])
def test_every_meta_trained_method_trains_on_a_range_of_shots(method: str, backbone: str, options: dict[str, object], synthetic_file: Path, tmp_path: Path) -> None:
    recipe = quick_recipe(synthetic_file, tmp_path / method, method=method, backbone=backbone, method_options=options,
                          shape="5w1-3s2q", episodes=6, meta_batch=2)
    recipe.validation.every = 6
    meta_train(recipe, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [row["episode"] for row in rows if row["phase"] == "train"] == [2, 4, 6]
    assert all(math.isfinite(row["loss"]) for row in rows if row["phase"] == "train")
