"""scripts/park_run.py: a stopped run parked in the repository comes back resumable; a running one is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import pytest
import torch

from conftest import load_script, quick_recipe
from fsltool.checkpoint import load_checkpoint
from fsltool.folder_lock import FolderLock
from fsltool.train import meta_train


def test_a_parked_run_resumes_where_it_stopped(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    park_run = load_script("park_run")
    monkeypatch.chdir(tmp_path)
    straight = quick_recipe(synthetic_file, Path("runs/straight"), episodes=8)
    meta_train(straight, quiet=True)
    cut = quick_recipe(synthetic_file, Path("runs/cut"), episodes=4)
    meta_train(cut, quiet=True)

    with FolderLock("runs/cut", "run folder"), pytest.raises(click.ClickException, match="still running"):
        park_run.park(Path("runs/cut"))
    parked = park_run.park(Path("runs/cut"))
    assert {path.name for path in parked} == {"recipe.yaml", "metrics.jsonl", "last.pt", "best.pt"}
    assert all(path.is_relative_to(Path("results/parked/runs/cut")) for path in parked)

    shutil.rmtree("runs/cut")  # the next sitting's fresh checkout
    park_run.unpark(Path("runs/cut"))
    with pytest.raises(click.ClickException, match="already holds a checkpoint"):
        park_run.unpark(Path("runs/cut"))
    cut.train.episodes = 8
    meta_train(cut, quiet=True, resume=True)
    expected = load_checkpoint(Path("runs/straight/checkpoints/last.pt"))["model"]
    resumed = load_checkpoint(Path("runs/cut/checkpoints/last.pt"))["model"]
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)

    park_run.drop(Path("runs/cut"))
    assert not Path("results/parked/runs/cut").exists()
    with pytest.raises(click.ClickException, match="nothing parked"):
        park_run.unpark(Path("runs/cut"))


def test_paths_outside_the_repository_are_refused(tmp_path: Path) -> None:
    park_run = load_script("park_run")
    with pytest.raises(click.ClickException, match="relative to the repository"):
        park_run.park(tmp_path / "run")


def test_parking_carries_the_ensembles_members(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that keeps its best-validated checkpoints (train.keep_best_checkpoints) parks and unparks them too, so
    ``evaluate --ensemble`` works on the next machine."""
    from fsltool.runs import RunFolder

    park_run = load_script("park_run")
    monkeypatch.chdir(tmp_path)
    recipe = quick_recipe(synthetic_file, Path("runs/ensemble"), episodes=8, keep_checkpoints=1, keep_best_checkpoints=2, lr=0.01)
    recipe.validation.every = 2
    meta_train(recipe, quiet=True)
    members = {path.name for path, _ in RunFolder("runs/ensemble").best_validated(2)}
    assert len(members) == 2
    parked = {path.name for path in park_run.park(Path("runs/ensemble"))}
    assert parked == {"recipe.yaml", "metrics.jsonl", "last.pt", "best.pt", *members}
    shutil.rmtree("runs/ensemble")
    park_run.unpark(Path("runs/ensemble"))
    assert {path.name for path, _ in RunFolder("runs/ensemble").best_validated(2)} == members


def test_a_run_too_large_for_the_repository_is_refused_and_nothing_is_written(synthetic_file: Path, tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Parked files go into the repository's history for good: above --max-mb (a SNAIL 20w5s run's 128 MB
    checkpoints) parking stops with the size, and an earlier parked copy stays as it was."""
    park_run = load_script("park_run")
    monkeypatch.chdir(tmp_path)
    meta_train(quick_recipe(synthetic_file, Path("runs/big"), episodes=4), quiet=True)
    earlier = park_run.park(Path("runs/big"))
    before = {path: path.read_bytes() for path in earlier}
    megabytes = sum(path.stat().st_size for path in park_run.resumable_files(park_run.RunFolder(Path("runs/big")))) / 2**20
    with pytest.raises(click.ClickException, match=r"resumable files take \d+\.\d MB .*more than --max-mb 0.01"):
        park_run.park(Path("runs/big"), max_mb=0.01)
    assert {path: path.read_bytes() for path in earlier} == before
    assert park_run.park(Path("runs/big"), max_mb=megabytes + 0.01) == earlier  # at the limit it parks


def test_the_command_line_runs_each_action_with_its_own_options(synthetic_file: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`park_run.py park|unpark|drop FOLDER [--parked DIR]`; only park takes --max-mb, and an error exits non-zero
    with its one-line message."""
    from click.testing import CliRunner

    park_run = load_script("park_run")
    monkeypatch.chdir(tmp_path)
    meta_train(quick_recipe(synthetic_file, Path("runs/cli"), episodes=4), quiet=True)
    runner = CliRunner()
    refused = runner.invoke(park_run.main, ["park", "runs/cli", "--parked", "kept", "--max-mb", "0.001"])
    assert refused.exit_code == 1 and "more than --max-mb 0.001" in refused.output and not Path("kept").exists()
    parked = runner.invoke(park_run.main, ["park", "runs/cli", "--parked", "kept"])
    assert parked.exit_code == 0 and "park: kept/runs/cli/checkpoints/last.pt" in parked.output
    assert runner.invoke(park_run.main, ["drop", "runs/cli", "--parked", "kept", "--max-mb", "1"]).exit_code == 2
    shutil.rmtree("runs/cli")
    assert runner.invoke(park_run.main, ["unpark", "runs/cli", "--parked", "kept"]).exit_code == 0
    assert Path("runs/cli/checkpoints/last.pt").is_file()
    assert runner.invoke(park_run.main, ["drop", "runs/cli", "--parked", "kept"]).exit_code == 0
    assert not Path("kept/runs/cli").exists()
