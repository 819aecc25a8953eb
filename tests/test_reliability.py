"""Reliability of the writing commands: one process per run or export folder, the same data checks in
``--check`` and training, and a full disk reported as one line with nothing partial left."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from fsltool.checkpoint import save_checkpoint
from fsltool.data.pack import _GuardedFile, pack
from fsltool.data.sources.synthetic import synthetic
from fsltool.errors import FsltoolError
from fsltool.export import export_run
from fsltool.folder_lock import LOCK_NAME, FolderLock
from fsltool.pretrain import pretrain
from fsltool.runs import RunFolder
from fsltool.train import meta_train
from tests.conftest import quick_recipe, run_cli, small_plan
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


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB file system (tmpfs) that fills up: root only, skipped elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def prepare_synthetic(out: Path, *options: str) -> list[str]:
    return ["prepare", "synthetic", str(out), "--shapes", "5w1s,5w5s", "-q", *options]


def test_prepare_onto_a_full_disk_says_so_and_leaves_nothing(tiny_disk: Path) -> None:
    out = tiny_disk / "data.h5"
    out.write_bytes(b"the user's file")
    # The images alone cannot fit: refused before anything is written.
    code, _, err = run_cli(*prepare_synthetic(out, "--classes", "200", "--force"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "data.h5: no space left on device for 4000 images of 1x28x28 pixels (uncompressed): needs up to 3.1 MB" in err
    # The images fit but the stored episodes do not: HDF5's failed write is one line, not a crash.
    code, _, err = run_cli(*prepare_synthetic(out, "--classes", "60", "--episodes", "2000", "--force"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{out}: no space left on device while writing the data file" in err
    assert sorted(path.name for path in tiny_disk.iterdir()) == ["data.h5"] and out.read_bytes() == b"the user's file"


def test_a_crashing_hdf5_close_is_never_reached_in_a_real_process(tiny_disk: Path) -> None:
    """HDF5 2.0 segfaults closing a file after a failed write: the command must end with exit 2, not signal 11."""
    result = subprocess.run([sys.executable, "-m", "fsltool", *prepare_synthetic(tiny_disk / "data.h5", "--classes", "60",
                                                                                 "--episodes", "2000")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no space left on device" in result.stderr and not list(tiny_disk.iterdir())


def test_meta_training_onto_a_full_disk_says_so_and_leaves_whole_files(synthetic_file: Path, tiny_disk: Path) -> None:
    recipe_file = tiny_disk.parent / "recipe.yaml"
    run = tiny_disk / "run"
    recipe_file.write_text(yaml.safe_dump(quick_recipe(synthetic_file, run, episodes=8, log_every=1).to_dict()))
    code, _, err = run_cli("meta-train", str(recipe_file), "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{run / 'checkpoints'}/" in err and ".pt: no space left on device while writing the checkpoint" in err
    leftovers = [path.name for path in run.rglob("*") if path.name.startswith(".")]
    assert leftovers == []  # no partial checkpoint, and the run folder's lock released
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def failing_after(budget: int) -> Callable[[int], None]:
    """A write that finds the disk full once ``budget`` bytes have been written."""
    written = {"bytes": 0}

    def spend(size: int) -> None:
        written["bytes"] += size
        if written["bytes"] > budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return spend


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"episode": 1})
    before = path.read_bytes()
    spend = failing_after(10_000)

    class FullDisk(io.BufferedWriter):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            spend(len(data))
            return super().write(data)

    monkeypatch.setattr("fsltool.atomic.open", lambda file, mode: FullDisk(io.FileIO(file, mode)), raising=False)
    with pytest.raises(FsltoolError, match=r"last.pt: no space left on device while writing the checkpoint"):
        save_checkpoint(path, {"episode": 2, "weights": torch.zeros(100_000)})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_log_row_that_does_not_fit_is_cut_off_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunFolder(tmp_path)
    run.log({"episode": 1, "loss": 0.5})
    before = run.metrics.read_bytes()
    spend = failing_after(8)

    class FullDisk(io.FileIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            written = super().write(bytes(data)[:8])  # a short write, then the disk is full
            spend(written + 1)
            return written

    monkeypatch.setattr("fsltool.runs.open", lambda file, mode, buffering: FullDisk(file, mode), raising=False)
    with pytest.raises(FsltoolError, match="metrics.jsonl: no space left on device while writing the metrics log"):
        run.log({"episode": 2, "loss": 0.25})
    assert run.metrics.read_bytes() == before


def test_packing_stops_at_the_first_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spend = failing_after(100_000)
    original = _GuardedFile._write_all

    def write_all(self: _GuardedFile, data: memoryview) -> None:
        spend(data.nbytes)
        original(self, data)

    monkeypatch.setattr(_GuardedFile, "_write_all", write_all)
    with pytest.raises(FsltoolError, match="data.h5: no space left on device while writing the data file"):
        pack(synthetic(classes=60, images_per_class=20), tmp_path / "data.h5", small_plan(), quiet=True)
    assert list(tmp_path.iterdir()) == []
