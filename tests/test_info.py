"""`fsltool info RUN` on a run that has not written its first checkpoint: described from its recipe.yaml and its
metrics log, running or stopped by the folder's lock."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from fsltool.checkpoint import load_checkpoint, save_checkpoint, trained_on
from fsltool.errors import FsltoolError
from fsltool.folder_lock import FolderLock
from fsltool.info import describe
from fsltool.recipe import dump_recipe, recipe_from_dict
from tests.conftest import quick_recipe, run_cli, trained


def started_run(folder: Path, recipe: dict[str, object], log: list[dict[str, object]]) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "recipe.yaml").write_text(dump_recipe(recipe_from_dict(recipe)))
    lines = "".join(json.dumps(record) + "\n" for record in log)
    (folder / "metrics.jsonl").write_text(lines + '{"episode": 3')  # a row being written
    return folder


def test_a_run_before_its_first_checkpoint(tmp_path: Path) -> None:
    log = [{"episode": 50 * i, "phase": "train", "episodes_per_s": 2.0, "elapsed": 25.0 * i} for i in range(1, 7)]
    run = started_run(tmp_path / "run", {"method": "protonet", "train": {"episodes": 1000, "shape": "20w1-5s2q"}}, log)
    with FolderLock(run, "run folder"):
        running = describe(run)
    assert running["status"] == f"running (pid {os.getpid()})" and running["checkpoint"] == "none yet"
    assert running["train_shape"] == "20w1-5s2q"
    assert (running["stage"], running["episodes_planned"], running["latest_logged_episode"]) == ("meta-train", 1000, 300)
    assert running["episodes_per_s"] == 2.0 and running["time_left"].startswith("6 min")  # 700 episodes at 2 per s
    assert "resume" not in running

    stopped = describe(run)
    assert stopped["status"] == "stopped" and "time_left" not in stopped
    assert stopped["resume"] == f"fsltool meta-train {run / 'recipe.yaml'} --resume"


def test_a_pretraining_run_is_told_by_its_log(tmp_path: Path) -> None:
    log = [{"epoch": 0.5, "step": 100, "phase": "train", "steps_per_s": 10.0},
           {"epoch": 1, "step": 200, "phase": "val", "accuracy": 90.0, "ci95": 1.0, "shape": "5w1s15q"}]
    run = started_run(tmp_path / "run", {"method": "protonet", "pretrain": {"epochs": 4}}, log)
    described = describe(run)
    assert (described["stage"], described["epochs_planned"], described["latest_logged_step"]) == ("pretrain", 4, 100)
    assert described["latest_validation"] == {"step": 200, "epoch": 1, "accuracy": 90.0, "ci95": 1.0, "shape": "5w1s15q"}
    assert described["resume"].startswith("fsltool pretrain ")


def test_a_folder_with_checkpoints_but_no_recipe_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FsltoolError, match="neither a checkpoint nor a readable recipe.yaml"):
        describe(tmp_path / "run")


def test_a_long_log_read_from_a_cut_line_gives_its_last_row(tmp_path: Path) -> None:
    log = [{"episode": i, "phase": "train", "episodes_per_s": 1.0, "padding": "x" * 100} for i in range(1, 2001)]
    run = started_run(tmp_path / "run", {"method": "protonet", "train": {"episodes": 5000}}, log)
    assert (run / "metrics.jsonl").stat().st_size > 200_000
    assert describe(run)["latest_logged_episode"] == 2000


def test_the_latest_validation_is_found_behind_many_training_rows(tmp_path: Path) -> None:
    log = [{"episode": 1, "phase": "val", "accuracy": 50.0, "ci95": 2.0, "shape": "5w1s15q"}]
    log += [{"episode": i, "phase": "train", "episodes_per_s": 1.0, "padding": "x" * 200} for i in range(2, 2002)]
    run = started_run(tmp_path / "run", {"method": "protonet", "train": {"episodes": 5000}}, log)
    assert describe(run)["latest_validation"]["accuracy"] == 50.0


def test_a_run_resumed_elsewhere_names_every_machine() -> None:
    assert trained_on({}, "a") == ["a"]  # a checkpoint from before the record
    assert trained_on({"machines": ["a"]}, "a") == ["a"]
    assert trained_on({"machines": ["a"]}, "b") == ["a", "b"]


def test_a_folder_of_runs_is_listed_one_run_per_line(tmp_path: Path) -> None:
    """`fsltool info runs/`: every run folder below (not inside a run), with its status and progress; one that
    cannot be read is listed with its error rather than ending the listing."""
    log = [{"episode": 50 * i, "phase": "train", "episodes_per_s": 2.0} for i in range(1, 4)]
    started_run(tmp_path / "runs" / "a", {"method": "protonet", "train": {"episodes": 1000}}, log)
    started_run(tmp_path / "runs" / "group" / "b", {"method": "maml", "train": {"episodes": 400}}, log[:1])
    (tmp_path / "runs" / "broken" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "checkpoints" / "inner" / "checkpoints").mkdir(parents=True)  # inside a run: not listed
    with FolderLock(tmp_path / "runs" / "a", "run folder"):
        listed = describe(tmp_path / "runs")
        code, out, _ = run_cli("info", str(tmp_path / "runs"))
    assert listed["kind"] == "run folders"
    runs = {Path(run["path"]).relative_to(tmp_path / "runs").as_posix(): run for run in listed["runs"]}
    assert list(runs) == ["a", "broken", "group/b"]
    assert runs["a"]["status"].startswith("running") and runs["a"]["latest_logged_episode"] == 150
    assert runs["group/b"]["status"] == "stopped" and runs["group/b"]["episodes_planned"] == 400
    assert "neither a checkpoint nor a readable recipe.yaml" in runs["broken"]["error"]
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and lines[0].split()[:3] == ["run", "method", "status"]
    assert lines[1].split()[:5] == ["a", "protonet", "running", "(pid", f"{os.getpid()})"] and "150 / 1,000 episodes" in lines[1]
    assert lines[3].startswith("group/b") and "stopped" in lines[3]
    with pytest.raises(FsltoolError, match="nor a folder of run folders"):
        describe(tmp_path / "runs" / "group" / "b" / "checkpoints")


def test_a_run_stopped_before_its_first_validation_has_no_best_yet(synthetic_file: Path, tmp_path: Path) -> None:
    """A checkpoint written by a stop before any validation holds best -inf: info says None, and its JSON stays
    strict JSON (no -Infinity)."""
    run = trained(quick_recipe(synthetic_file, tmp_path / "run", episodes=2))
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    save_checkpoint(last, {**state, "best": {"accuracy": -math.inf, "ci95": math.nan, "episode": 0}})
    assert describe(run)["best_validation"] is None
    assert describe(run)["machines"] == state["machines"] and len(state["machines"]) == 1  # what it trained on

    def strict(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")
    code, out, _ = run_cli("info", str(run), "--json")
    assert code == 0 and json.loads(out, parse_constant=strict)["best_validation"] is None
    code, out, _ = run_cli("info", str(tmp_path))
    assert code == 0 and "inf" not in out
