"""last.pt on time between validations (``checkpoint_minutes``): written where it is due and nowhere else, it changes
nothing in the training, and a run taken back from it ends exactly as an uninterrupted one; ``fsltool info`` says
where a killed run's --resume continues."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import fsltool.pretrain
import fsltool.train
from fsltool.checkpoint import load_checkpoint
from fsltool.info import describe
from fsltool.pretrain import pretrain
from fsltool.recipe import Recipe, recipe_from_dict
from fsltool.train import meta_train
from tests.conftest import quick_recipe, run_cli
from tests.test_pretrain import losses, pretrain_recipe

EVERY_STEP = 1e-9  # minutes: due after every step


@pytest.fixture
def last_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, bytes]]:
    """Every last.pt the loops write, by its count of optimizer steps (meta-training: episodes), with its bytes."""
    written: dict[int, bytes] = {}
    for module in (fsltool.train, fsltool.pretrain):
        original = module.save_checkpoint

        def recording(path: Path, state: dict[str, Any], original: Any = original) -> None:
            original(path, state)
            if path.name == "last.pt":
                written[state["episode"] if "episode" in state else state["step"]] = path.read_bytes()
        monkeypatch.setattr(module, "save_checkpoint", recording)
    yield written


def meta_recipe(data: Path, output: Path, minutes: float) -> Recipe:
    recipe = quick_recipe(data, output, episodes=6, lr_step=2, checkpoint_minutes=minutes)
    recipe.validation.every = 6  # no validation before the end
    return recipe


def assert_same_parameters(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.parametrize("minutes, writes", [(EVERY_STEP, [1, 2, 3, 4, 5, 6]), (0.0, [6]), (10.0, [6])])
def test_meta_training_writes_last_when_due_and_only_then(synthetic_file: Path, tmp_path: Path, last_writes: dict[int, bytes],
                                                          minutes: float, writes: list[int]) -> None:
    meta_train(meta_recipe(synthetic_file, tmp_path / "run", minutes), quiet=True)
    assert sorted(last_writes) == writes
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.pt", "episode-00000006.pt", "last.pt"]


def test_a_run_taken_back_from_a_timed_checkpoint_ends_as_an_uninterrupted_one(synthetic_file: Path, tmp_path: Path,
                                                                               last_writes: dict[int, bytes]) -> None:
    meta_train(meta_recipe(synthetic_file, tmp_path / "straight", 0.0), quiet=True)
    recipe = meta_recipe(synthetic_file, tmp_path / "timed", EVERY_STEP)
    meta_train(recipe, quiet=True)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    assert_same_parameters(straight, load_checkpoint(tmp_path / "timed" / "checkpoints" / "last.pt")["model"])
    last = tmp_path / "timed" / "checkpoints" / "last.pt"
    last.write_bytes(last_writes[3])  # as if killed during episode 4
    recipe.train.checkpoint_minutes = 0.0  # may change on --resume
    meta_train(recipe, quiet=True, resume=True)
    resumed = load_checkpoint(last)
    assert resumed["episode"] == 6
    assert_same_parameters(straight, resumed["model"])


def three_epochs(data: Path, output: Path, minutes: float, settings: dict[str, Any]) -> Recipe:
    """Pretraining for 3 epochs, validated at the end only, a log row per step."""
    raw = pretrain_recipe(data, output, epochs=3, log_every=1, checkpoint_minutes=minutes).to_dict()
    raw["pretrain"].update(settings)
    raw["validation"]["every"] = 3
    return recipe_from_dict(raw)


@pytest.mark.parametrize("settings", [{}, {"augment": {"kind": "glyph"}, "rotation_weight": 0.5, "head": "cosine"}],
                         ids=["plain", "augmented"])
def test_pretraining_writes_last_within_epochs_when_due_and_resumes_there_exactly(synthetic_file: Path, tmp_path: Path,
                                                                                 last_writes: dict[int, bytes],
                                                                                 settings: dict[str, Any]) -> None:
    pretrain(three_epochs(synthetic_file, tmp_path / "straight", 0.0, settings), quiet=True)
    steps = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["step"]
    per_epoch = steps // 3
    assert sorted(last_writes) == [steps] and per_epoch >= 2
    last_writes.clear()
    timed = three_epochs(synthetic_file, tmp_path / "timed", EVERY_STEP, settings)
    pretrain(timed, quiet=True)
    assert sorted(last_writes) == list(range(1, steps + 1))
    within = per_epoch + 1  # the second epoch's first step
    last = tmp_path / "timed" / "checkpoints" / "last.pt"
    last.write_bytes(last_writes[within])  # as if killed during the step after
    state = load_checkpoint(last)
    assert (state["epoch"], state["step"]) == (1, within)  # one whole epoch, one step into the next
    pretrain(timed, quiet=True, resume=True)
    expected, got = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt"), load_checkpoint(last)
    assert (got["epoch"], got["step"]) == (3, steps)
    assert_same_parameters(expected["model"], got["model"])
    for name in expected["heads"]:
        assert_same_parameters(expected["heads"][name], got["heads"][name])
    assert losses(tmp_path / "timed") == losses(tmp_path / "straight")  # the log cut back at that step, then continued


def test_info_lists_a_killed_run_at_its_checkpoint_with_the_log_beside(synthetic_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "killed"
    meta_train(quick_recipe(synthetic_file, run, episodes=8), quiet=True)  # validates every 4
    checkpoints = run / "checkpoints"
    (checkpoints / "last.pt").write_bytes((checkpoints / "episode-00000004.pt").read_bytes())  # the log went on to 8
    details = describe(run)
    assert details["status"] == "stopped" and details["episodes_trained"] == 4 and details["latest_logged_episode"] == 8
    code, out, _ = run_cli("info", str(tmp_path / "runs"))
    assert code == 0 and "4 / 8 episodes (logged to 8)" in out.splitlines()[1]
