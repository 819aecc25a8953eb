"""Reliability of the writing commands: one process per run or export folder, the same data checks in
``--check`` and training, and a full disk reported as one line with nothing partial left."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fsltool.errors import FsltoolError
from fsltool.export import export_run
from fsltool.folder_lock import LOCK_NAME, FolderLock
from fsltool.pretrain import pretrain
from fsltool.train import meta_train
from tests.conftest import quick_recipe, run_cli
from tests.test_pretrain import pretrain_recipe


def dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def wait_for(path: Path, process: subprocess.Popen[str], seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_a_second_run_into_a_busy_run_folder_is_refused_naming_the_holder(synthetic_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(quick_recipe(synthetic_file, run, episodes=100_000, log_every=1).to_dict()))
    first = subprocess.Popen([sys.executable, "-m", "fsltool", "meta-train", str(recipe_file), "-q"], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(run / "metrics.jsonl", first)  # training, not just started
        assert (run / LOCK_NAME).read_text().strip() == str(first.pid)
        code, _, err = run_cli("meta-train", str(recipe_file), "--force", "-q")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"this run folder is in use by another fsltool process (pid {first.pid}" in err
        rows = (run / "metrics.jsonl").read_text()
        code, _, err = run_cli("pretrain", str(recipe_file), "pretrain.epochs=1", "--force", "-q")
        assert code == 2 and f"(pid {first.pid}" in err
        assert (run / "metrics.jsonl").read_text().startswith(rows)  # --force deleted nothing of the running run's
    finally:
        first.kill()  # SIGKILL: no clean-up runs, so the lock file stays behind, stale
        first.wait()
    assert (run / LOCK_NAME).is_file()
    meta_train(quick_recipe(synthetic_file, run, episodes=2), quiet=True, force=True)  # the dead holder's lock is taken over
    assert not (run / LOCK_NAME).exists()


def test_a_stale_lock_file_is_taken_over_and_the_lock_released_at_the_end(synthetic_file: Path, tmp_path: Path) -> None:
    for train in (lambda run: meta_train(quick_recipe(synthetic_file, run, episodes=2), quiet=True),
                  lambda run: pretrain(pretrain_recipe(synthetic_file, run, epochs=1), quiet=True)):
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        (run / LOCK_NAME).write_text(f"{dead_pid()}\n")
        train(run)
        assert (run / "checkpoints" / "last.pt").is_file() and not (run / LOCK_NAME).exists()


def test_the_lock_is_released_when_a_run_fails(synthetic_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FsltoolError, match="fewer than the 500 ways"):
        meta_train(quick_recipe(synthetic_file, tmp_path / "new", shape="500w1s1q"), quiet=True)
    assert not (tmp_path / "new").exists()  # a folder made only to hold the lock goes with it
    meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=2), quiet=True)
    with pytest.raises(FsltoolError, match="already trained 2 episodes"):
        meta_train(quick_recipe(synthetic_file, tmp_path / "run", episodes=2), quiet=True, resume=True)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["checkpoints", "metrics.jsonl", "recipe.yaml"]


def test_a_busy_export_folder_is_refused_and_the_lock_released_after_export(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    with FolderLock(out, "export folder"):
        code, _, err = run_cli("export", str(trained_run), "--out", str(out), "--verify-episodes", "0", "-q")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"this export folder is in use by another fsltool process (pid {os.getpid()}" in err
        assert sorted(path.name for path in out.iterdir()) == [LOCK_NAME]
    assert not out.exists()  # made for the lock alone, so removed with it
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{dead_pid()}\n")
    export_run(trained_run, out, verify_episodes=0)
    assert not (out / LOCK_NAME).exists() and (out / "classifier.onnx").is_file()


@pytest.mark.parametrize("command", ["meta-train", "pretrain"])
def test_check_and_training_refuse_the_same_data_file_without_stored_test_episodes(command: str, synthetic_file: Path,
                                                                                    tmp_path: Path) -> None:
    """A run whose test_shape the data file does not store could never be evaluated: training refuses it before
    it starts, with --check's message."""
    recipe = pretrain_recipe(synthetic_file, tmp_path / "run", epochs=1).to_dict()
    recipe["test_shape"] = "20w5s5q"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    answers = [run_cli(command, str(recipe_file), *flag, "-q") for flag in (["--check"], [])]
    for code, _, err in answers:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "no stored test episodes of shape 20w5s5q (stored: 5w1s5q, 5w5s5q)" in err
    assert answers[0][2] == answers[1][2]
    assert not (tmp_path / "run").exists()

