"""Data-parallel meta-training: a real 2-process torchrun (gloo) run ends with the parameters and BatchNorm running
averages of a 1-process run with the same seed and global meta-batch, for a metric method and for MAML and
Reptile; a distributed run resumes to the same result; only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fsltool.checkpoint import load_checkpoint
from fsltool.distributed import Group, RunningStats
from fsltool.errors import FsltoolError
from fsltool.recipe import recipe_from_dict
from fsltool.train import meta_train
from tests.conftest import quick_recipe

ADAPTIVE = {"shape": "5w1s5q", "lr": 0.01}  # MAML and Reptile's head has the episodes' way: train at the val way
CASES = {
    "protonet": ({}, {}),
    "maml": ({"way": 5, "inner_steps": 1, "test_inner_steps": 1, "inner_lr": 0.4}, ADAPTIVE),
    "reptile": ({"way": 5, "inner_steps": 2, "inner_batch": 5, "test_inner_steps": 2, "test_inner_batch": 5}, ADAPTIVE),
}


def recipe_dict(data: Path, output: Path, method: str, episodes: int) -> dict[str, Any]:
    options, train = CASES[method]
    recipe = quick_recipe(data, output, method=method, method_options=options, episodes=episodes, meta_batch=4,
                          log_every=1, optimizer="sgd", **train)
    recipe.validation.every = 2
    return recipe.to_dict()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(*program: str, processes: int = 2) -> subprocess.CompletedProcess[str]:
    """``program`` (a script and its arguments, or ``-m module ...``) under a real torchrun of ``processes``."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", *program]
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def torchrun(recipe: dict[str, Any], folder: Path, *args: str, processes: int = 2, command: str = "meta-train") -> subprocess.CompletedProcess[str]:
    path = folder / f"recipe-{free_port()}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return launch("-m", "fsltool", command, str(path), "-q", *args, processes=processes)


def assert_same_state(expected_run: Path, got_run: Path) -> None:
    expected = load_checkpoint(expected_run / "checkpoints" / "last.pt")
    got = load_checkpoint(got_run / "checkpoints" / "last.pt")
    assert expected["episode"] == got["episode"]
    assert expected["model"].keys() == got["model"].keys()
    for key, value in expected["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=1e-5, atol=1e-5, msg=key)  # buffers too: BN averages
    assert torch.equal(expected["sampler_rng"], got["sampler_rng"]) and torch.equal(expected["torch_rng"], got["torch_rng"])


@pytest.mark.parametrize("method", list(CASES))
def test_two_processes_train_like_one(method: str, synthetic_file: Path, tmp_path: Path) -> None:
    meta_train(recipe_from_dict(recipe_dict(synthetic_file, tmp_path / "one", method, 4)), quiet=True)
    result = torchrun(recipe_dict(synthetic_file, tmp_path / "two", method, 4), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_state(tmp_path / "one", tmp_path / "two")
    assert result.stdout.count("run folder:") == 1  # rank 0 alone reports
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [row["episode"] for row in two] == [row["episode"] for row in one]  # one writer: no duplicated rows
    for a, b in zip(one, two):
        if a["phase"] == "train":
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == pytest.approx(b["accuracy"])


def test_a_distributed_run_resumes_to_the_same_parameters(synthetic_file: Path, tmp_path: Path) -> None:
    meta_train(recipe_from_dict(recipe_dict(synthetic_file, tmp_path / "one", "protonet", 6)), quiet=True)
    first = torchrun(recipe_dict(synthetic_file, tmp_path / "two", "protonet", 2), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(recipe_dict(synthetic_file, tmp_path / "two", "protonet", 6), tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(tmp_path / "one", tmp_path / "two")


def test_a_meta_batch_that_does_not_divide_among_the_processes_is_refused() -> None:
    assert Group(1, 2).share(4) == range(2, 4)
    with pytest.raises(FsltoolError, match=r"'train.meta_batch': 3 episodes do not divide among 2 processes"):
        Group(0, 2).share(3)


def test_world_size_without_torchrun_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from fsltool.distributed import join

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(FsltoolError, match="WORLD_SIZE=2: cannot join the process group .*launch with torchrun"):
        join()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(FsltoolError, match="MASTER_ADDR"):
        join()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join() == Group()


def test_every_tensor_handed_to_a_collective_lives_on_the_parameters_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 'meta' device stands in for a GPU: a CPU tensor handed to a collective (NCCL refuses them) is caught, and
    so is any read back to the host (meta tensors have no values)."""
    devices: list[torch.device] = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *args, **kwargs: devices.append(tensor.device))
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(36, 3),
                                  torch.nn.BatchNorm1d(3)).to("meta")
    group = Group(0, 2)
    before = RunningStats.of(network)
    network(torch.zeros(8, 1, 5, 5, device="meta"))  # advances the running averages
    for parameter in network.parameters():
        parameter.grad = torch.zeros_like(parameter)
    group.sum_gradients(list(network.parameters()))
    group.merge_running_stats(before)
    group.sum(torch.zeros(3, device="meta"))
    assert len(devices) == 4 and all(device.type == "meta" for device in devices), devices


def test_a_cuda_rank_selects_its_own_gpu_before_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    from fsltool.distributed import join

    calls: list[tuple[str, object]] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **options: calls.append(("join", backend)))
    assert join(torch.device("cuda", 1)) == Group(1, 2)
    assert calls == [("set_device", torch.device("cuda", 1)), ("join", "nccl")]


HANDSHAKE = """
import sys, time
from pathlib import Path
from fsltool.distributed import join

group = join()
marker = Path(sys.argv[1])
if group.rank == 1:
    time.sleep(2)  # rank 0 reaches the handshake first and must wait for this process
    marker.write_text("reached")
group._all_reach("test")
if group.rank == 0 and not marker.exists():
    sys.exit("rank 0 came out of the handshake before rank 1 reached it")
group.leave(finished=True)
"""


def test_no_process_leaves_the_teardown_handshake_before_every_process_has_reached_it(tmp_path: Path) -> None:
    """The handshake after the final barrier (so that no process closes its connections while another's barrier
    is still sending) holds the early process until the late one arrives."""
    script = tmp_path / "handshake.py"
    script.write_text(HANDSHAKE)
    result = launch(str(script), str(tmp_path / "marker"))
    assert result.returncode == 0, result.stderr[-3000:]
