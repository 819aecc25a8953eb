"""Where methods run (fsltool.device): the recipe's ``device`` resolved on this machine, errors when a GPU is asked
for and missing, and a run that resumes on another device. The CUDA path itself needs a GPU: see
scripts/gpu_check.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fsltool.device import device_of, machine_description, resolve_device
from fsltool.errors import FsltoolError
from fsltool.methods import build_method
from fsltool.models import build_backbone
from tests.conftest import quick_recipe, run_cli


def test_auto_is_the_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_and_cuda_pick_this_process_gpu_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(FsltoolError, match=r"'cuda:7': GPU 7 asked for, but torch sees 4"):
        resolve_device("cuda:7")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "CPU", "cuda:x", ""])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(FsltoolError, match="is not one of auto, cpu, cuda, cuda:N"):
        resolve_device(name)


def test_asking_for_a_missing_gpu_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FsltoolError, match="'cuda' asked for, but torch sees no CUDA device"):
        resolve_device("cuda")


def test_device_of_a_method() -> None:
    method = build_method("protonet", build_backbone("conv4", 1, [0.1], [0.3], hidden=4), {})
    assert device_of(method) == torch.device("cpu")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cpu_machine_names_the_kernels_vector_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    """AVX2 and AVX-512 kernels round differently: a run's list of machines must tell them apart."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    for capability in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        text = machine_description(torch.device("cpu"))
        assert f" ({capability}), " in text and text.endswith(f"torch {torch.__version__}, 1 thread")


def test_resuming_on_another_kind_of_machine_says_so(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=4)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    assert run_cli("meta-train", str(path), "-q")[0] == 0
    code, _, err = run_cli("meta-train", str(path), "train.episodes=6", "--resume", "-q")
    assert code == 0 and "note: resuming on" not in err  # the same machine: nothing to say
    here = machine_description(torch.device("cpu"))
    monkeypatch.setattr("fsltool.loop.machine_description", lambda device, processes=1: "Other CPU (AVX512), 2 cores")
    code, _, err = run_cli("meta-train", str(path), "train.episodes=8", "--resume", "-q")
    assert code == 0, err
    assert f"note: resuming on Other CPU (AVX512), 2 cores; the checkpoint was written on {here}" in " ".join(err.split())
    machines = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["machines"]
    assert machines == [here, "Other CPU (AVX512), 2 cores"]
    monkeypatch.undo()  # back on the first machine, then once more on it: the second resume has nothing to say
    code, _, err = run_cli("meta-train", str(path), "train.episodes=10", "--resume", "-q")
    assert code == 0 and "the checkpoint was written on Other CPU (AVX512), 2 cores" in " ".join(err.split())
    code, _, err = run_cli("meta-train", str(path), "train.episodes=12", "--resume", "-q")
    assert code == 0 and "note: resuming on" not in err


def test_resuming_under_another_fsltool_version_says_so(synthetic_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release may compute a step another way (0.7.1: the grouped network's layout): the resumed run is exact
    from its checkpoint but no longer one version's run, and the user hears it once, at that resume."""
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=4)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    assert run_cli("meta-train", str(path), "-q")[0] == 0
    code, _, err = run_cli("meta-train", str(path), "train.episodes=6", "--resume", "-q")
    assert code == 0 and "note: resuming with fsltool" not in err  # the same version: nothing to say
    written_by = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["fsltool_version"]
    monkeypatch.setattr("fsltool.loop.__version__", "99.0.0")
    monkeypatch.setattr("fsltool.checkpoint.__version__", "99.0.0")
    code, _, err = run_cli("meta-train", str(path), "train.episodes=8", "--resume", "-q")
    assert code == 0, err
    assert f"note: resuming with fsltool 99.0.0; the checkpoint was written by fsltool {written_by}" in " ".join(err.split())
    code, _, err = run_cli("meta-train", str(path), "train.episodes=10", "--resume", "-q")
    assert code == 0 and "note: resuming with fsltool" not in err  # its checkpoints are now the new version's


def test_meta_train_on_a_missing_gpu_names_the_key_and_writes_nothing(synthetic_file: Path, tmp_path: Path) -> None:
    recipe = quick_recipe(synthetic_file, tmp_path / "run")
    recipe.device = "cuda"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    code, _, err = run_cli("meta-train", str(path), "-q")
    assert code == 2
    assert "recipe key 'device': 'cuda' asked for, but torch sees no CUDA device" in err
    assert not (tmp_path / "run").exists()


def test_a_run_resumes_with_another_device(synthetic_file: Path, tmp_path: Path) -> None:
    """device and data_on_device are not part of what a resumed run must keep: a CPU run may continue on a GPU
    and back, with its images on the device or not."""
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=4)
    recipe.validation.every = 4
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    assert run_cli("meta-train", str(path), "-q")[0] == 0
    code, _, err = run_cli("meta-train", str(path), "train.episodes=6", "device=cpu", "data_on_device=true", "--resume", "-q")
    assert code == 0, err
    code, _, err = run_cli("meta-train", str(path), "train.episodes=8", "seed=3", "--resume", "-q")
    assert code == 2 and "the recipe differs" in err  # the control: other keys are still checked
