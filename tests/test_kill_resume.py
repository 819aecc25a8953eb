"""A run killed with SIGKILL at an arbitrary moment and resumed ends with exactly the parameters of an
uninterrupted run: checkpoints are atomic and carry every piece of state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fsltool.checkpoint import load_checkpoint
from fsltool.errors import FsltoolError
from fsltool.info import describe

EPISODES = 40


def write_recipe(path: Path, data: Path, output: Path) -> Path:
    recipe = {
        "data": str(data), "output": str(output),
        "train": {"shape": "10w1s5q", "episodes": EPISODES, "log_every": 5, "lr_step": 10},
        "validation": {"shape": "5w1s5q", "every": 5, "episodes": 5},
        "test_shape": "5w1s5q",
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def fsltool(*args: str) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # same kernels in both runs
    return subprocess.Popen([sys.executable, "-m", "fsltool", *args], env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def last_episode(run: Path) -> int:
    try:
        return int(load_checkpoint(run / "checkpoints" / "last.pt")["episode"])
    except FsltoolError:  # not written yet
        return 0


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_matches_an_uninterrupted_run(synthetic_file: Path, tmp_path: Path) -> None:
    straight = fsltool("meta-train", str(write_recipe(tmp_path / "a.yaml", synthetic_file, tmp_path / "straight")), "-q")
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()  # type: ignore[union-attr]

    killed_run = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "b.yaml", synthetic_file, killed_run)
    victim = fsltool("meta-train", str(recipe), "-q")
    deadline = time.monotonic() + 300
    while last_episode(killed_run) < 10 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    running = describe(killed_run)  # fsltool info while it trains
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    reached = last_episode(killed_run)
    assert 10 <= reached < EPISODES, f"the kill came too late to test anything (checkpoint at {reached})"
    assert running["status"] == f"running (pid {victim.pid})" and running["episodes_planned"] == EPISODES
    assert "resume" not in running

    stopped = describe(killed_run)  # the killed process's lock file is left behind: free all the same
    assert stopped["status"] == "stopped" and stopped["episodes_trained"] == reached
    program, command, *arguments = stopped["resume"].split()
    assert (program, command) == ("fsltool", "meta-train")
    resumed = fsltool(command, *arguments, "-q")  # the command info prints
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()  # type: ignore[union-attr]
    expected = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    got = load_checkpoint(killed_run / "checkpoints" / "last.pt")
    assert got["episode"] == expected["episode"] == EPISODES
    assert got["machines"] == expected["machines"] and len(got["machines"]) == 1  # resumed on the same machine
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key
    assert not list((killed_run / "checkpoints").glob("*.partial"))
