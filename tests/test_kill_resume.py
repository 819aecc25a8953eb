"""A run killed with SIGKILL at an arbitrary moment and resumed ends with exactly the parameters of an
uninterrupted run: checkpoints (at validations, or on time between them) are atomic and carry every piece of
state. A run stopped with SIGINT or SIGTERM saves the step it reached and resumes from there, exactly (meta-training
and pretraining)."""

from __future__ import annotations

import json
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


def write_recipe(path: Path, data: Path, output: Path, validate_every: int = 5, checkpoint_minutes: float = 10.0) -> Path:
    recipe = {
        "data": str(data), "output": str(output),
        "train": {"shape": "10w1s5q", "episodes": EPISODES, "log_every": 1, "lr_step": 10, "checkpoint_minutes": checkpoint_minutes},
        "validation": {"shape": "5w1s5q", "every": validate_every, "episodes": 5},
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
@pytest.mark.parametrize("validate_every, checkpoint_minutes", [(5, 10.0), (EPISODES, 1e-9)], ids=["validations", "timed"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(synthetic_file: Path, tmp_path: Path, validate_every: int,
                                                          checkpoint_minutes: float) -> None:
    straight = fsltool("meta-train", str(write_recipe(tmp_path / "a.yaml", synthetic_file, tmp_path / "straight")), "-q")
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()  # type: ignore[union-attr]

    killed_run = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "b.yaml", synthetic_file, killed_run, validate_every, checkpoint_minutes)
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


def logged_episode(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["episode"] for line in lines if line.endswith("}")), default=0)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_the_step_reached_and_resumes_exactly(synthetic_file: Path, tmp_path: Path, signal_name: str) -> None:
    number = getattr(signal, signal_name)
    straight = fsltool("meta-train", str(write_recipe(tmp_path / "a.yaml", synthetic_file, tmp_path / "straight", EPISODES)), "-q")
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()  # type: ignore[union-attr]

    stopped_run = tmp_path / "stopped"
    recipe = write_recipe(tmp_path / "b.yaml", synthetic_file, stopped_run, EPISODES)  # no checkpoint before the end
    victim = fsltool("meta-train", str(recipe), "-q")
    deadline = time.monotonic() + 300
    while logged_episode(stopped_run) < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(number)
    assert victim.wait(timeout=120) == 128 + number
    message = victim.stderr.read().decode()  # type: ignore[union-attr]
    reached = last_episode(stopped_run)
    assert 3 <= reached < EPISODES, f"the signal came too late to test anything (saved at {reached})"
    assert f"stopped: {signal_name} at episode {reached}: saved {stopped_run / 'checkpoints' / 'last.pt'}" in message
    assert f"fsltool meta-train {stopped_run / 'recipe.yaml'} --resume" in message

    resumed = fsltool("meta-train", str(stopped_run / "recipe.yaml"), "--resume", "-q")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()  # type: ignore[union-attr]
    expected = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    got = load_checkpoint(stopped_run / "checkpoints" / "last.pt")
    assert got["episode"] == EPISODES
    for key, value in expected.items():
        assert torch.equal(value, got["model"][key]), key


PRETRAIN_EPOCHS = 8


def write_pretrain_recipe(path: Path, data: Path, output: Path) -> Path:
    recipe = {
        "data": str(data), "output": str(output),
        "pretrain": {"epochs": PRETRAIN_EPOCHS, "batch_size": 16, "lr": 0.05, "log_every": 1},
        "validation": {"shape": "5w1s5q", "every": PRETRAIN_EPOCHS, "episodes": 5},
        "test_shape": "5w1s5q",
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line).get("step", 0) for line in lines if line.endswith("}")), default=0)


def test_a_stop_signal_saves_the_pretraining_step_reached_and_resumes_exactly(synthetic_file: Path, tmp_path: Path) -> None:
    straight = fsltool("pretrain", str(write_pretrain_recipe(tmp_path / "a.yaml", synthetic_file, tmp_path / "straight")), "-q")
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()  # type: ignore[union-attr]
    expected = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")

    stopped_run = tmp_path / "stopped"
    victim = fsltool("pretrain", str(write_pretrain_recipe(tmp_path / "b.yaml", synthetic_file, stopped_run)), "-q")
    deadline = time.monotonic() + 300
    while logged_step(stopped_run) < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(timeout=120) == 128 + signal.SIGTERM
    message = victim.stderr.read().decode()  # type: ignore[union-attr]
    saved = load_checkpoint(stopped_run / "checkpoints" / "last.pt")
    assert 3 <= saved["step"] < expected["step"], f"the signal came too late to test anything (saved at {saved['step']})"
    assert f"stopped: SIGTERM at step {saved['step']} (epoch " in message
    assert f"fsltool pretrain {stopped_run / 'recipe.yaml'} --resume" in message
    assert describe(stopped_run)["status"] == "stopped"

    resumed = fsltool("pretrain", str(stopped_run / "recipe.yaml"), "--resume", "-q")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()  # type: ignore[union-attr]
    got = load_checkpoint(stopped_run / "checkpoints" / "last.pt")
    assert got["step"] == expected["step"]
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key
