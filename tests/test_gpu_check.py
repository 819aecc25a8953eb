"""scripts/gpu_check.py's dry run on the CPU: every step a GPU session will run (fp32 and bf16 training with the
images kept on the device, and with them on the host; a speed target's own run; torchrun with two processes;
evaluation on both devices and of all stored episodes, timed; export verified under ONNX Runtime on the device;
fsltool predict on the export and on an enrolled folder; the runtime benchmark on one device) runs here too, so the
script a GPU machine gets is known to work end to end. The second-order MAML target is not trained here (a CPU
meta-step of 32 tasks costs more than the rest of its run): its recipe is checked to resolve to the target's shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fsltool.builtin_recipes import recipe_path
from fsltool.data.episodes import EpisodeShape
from fsltool.data.pack import EpisodePlan, pack
from fsltool.data.sources.synthetic import synthetic
from fsltool.recipe import load_recipe
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def gpu_check() -> ModuleType:
    return load_script("gpu_check")


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    data = tmp_path / "glyphs.h5"  # the omniglot/protonet recipes' shapes: 60-way training, stored 5w1s15q
    pack(synthetic(classes=110, images_per_class=16), data, EpisodePlan(shapes=(EpisodeShape(5, 1, 15),), episodes=10), quiet=True)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--methods", "protonet", "--targets", "protonet",
                           "--steps", "2", "--cpu-steps", "2", "--target-steps", "2", "--episodes", "5", "--repeats", "1",
                           "--data", str(data), "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert {"methods", "bf16", "targets", "checks", "onnxruntime", "seconds"} <= report.keys()
    assert report["device"] == "cpu" and "CPUExecutionProvider" in report["onnxruntime"]["providers"]

    fp32 = report["methods"]["protonet"]
    assert fp32["ok"] and fp32["precision"] == "fp32" and fp32["shape"] == "60w1s5q" and fp32["meta_steps_per_s"] > 0
    assert fp32["accuracy_device"] == fp32["accuracy_cpu"] and fp32["evaluated_episodes"] == 5
    assert fp32["cpu_meta_steps_per_s"] == fp32["meta_steps_per_s"] and fp32["device_over_cpu"] == 1.0  # the device is the CPU
    bf16 = report["bf16"]["protonet"]
    assert bf16["ok"] and bf16["precision"] == "bf16" and bf16["meta_steps_per_s"] > 0 and "not_applicable" not in bf16
    assert bf16["bf16_over_fp32"] > 0

    target = report["targets"]["ProtoNet 60w5s5q"]  # measured, not judged: 50 meta-steps/s is a GPU's target
    assert target["ok"] and target["shape"] == "60w5s5q" and target["meta_batch"] == 1 and target["meta_steps_per_s"] > 0
    assert target["target_meta_steps_per_s"] == 50.0 and target["met"] is None
    ort_target = report["targets"]["ONNX Runtime / PyTorch embedding throughput, batch 100"]
    assert ort_target["ok"] and ort_target["onnx_over_eager_batch100"] > 0 and ort_target["target"] == 1.0 and ort_target["met"] is None

    checks = report["checks"]
    torchrun = checks["torchrun meta-train"]
    assert torchrun["ok"] and torchrun["processes"] == 2 and torchrun["backend"] == "gloo" and torchrun["meta_batch"] == 2
    assert torchrun["meta_steps_per_s"] > 0 and torchrun["collective"] == {"ok": True, "backend": "gloo"}
    assert checks["export verified under ONNX Runtime"]["ok"] and checks["export verified under ONNX Runtime"]["provider"] == "CPUExecutionProvider"
    for folder in ("export", "enrolled"):
        predicted = checks[f"predict, {folder} folder, ONNX Runtime"]
        assert predicted["ok"] and predicted["provider"] == "CPUExecutionProvider", predicted
        assert predicted["queries"] == 15 and predicted["agreement"] == 1.0 and predicted["max_probability_difference"] <= 1e-3
    runtime = checks["ONNX Runtime vs PyTorch, same device"]
    assert runtime["ok"] and runtime["failed_runtimes"] == [] and runtime["onnx_over_eager_batch100"] > 0
    assert json.loads((out / "benchmark_runtime_cpu.json").read_text())["device"] == "cpu"
    evaluation = checks["evaluate, all stored test episodes"]
    assert evaluation["ok"] and evaluation["cpu"]["episodes"] == 10 and evaluation["cpu"]["seconds"] > 0 and "net_seconds" in evaluation["cpu"]
    host = checks["protonet, images on the host"]
    assert host["ok"] and host["meta_steps_per_s"] > 0
    layout = checks["grouped network, NCHW against channels-last maps"]
    assert layout["ok"] and list(layout["channels_last_speedup"]) == ["reptile-5w1s recipe: 5w1s9q x5, 5 x batch 10"], layout
    assert layout["channels_last_speedup"]["reptile-5w1s recipe: 5w1s9q x5, 5 x batch 10"] > 0

    for row in ("| protonet | ", "| ProtoNet 60w5s5q | ", "| torchrun meta-train | ok |", "| predict, enrolled folder, ONNX Runtime | ok |"):
        assert row in done.stdout, row


@pytest.mark.parametrize("key", ["protonet", "maml"])
def test_each_speed_target_recipe_resolves_to_the_target_shape(key: str) -> None:
    target = gpu_check().TARGETS[key]
    recipe = load_recipe(recipe_path(target.recipe), target.overrides)
    trained = {"shape": recipe.train.shape, "meta_batch": recipe.train.meta_batch, "precision": recipe.precision,
               "first_order": recipe.method_options.get("first_order")}
    assert {name: trained[name] for name in target.expected} == target.expected
    assert recipe.validation.shape == recipe.test_shape == "5w1s15q"  # stored in every prepared file


@pytest.mark.parametrize("method", ["svm", "ridge", "protonet"])
def test_each_method_resolves_to_a_recipe_that_trains_it(method: str) -> None:
    """The heads without an Omniglot recipe (svm, ridge) train the ProtoNet recipe's Conv-4 under their own method, with
    their default options, on 5-way episodes; every other method its own omniglot/<method>-5w1s."""
    name, overrides = gpu_check().method_recipe(method)
    recipe = load_recipe(recipe_path(name), overrides)
    assert recipe.method == method and recipe.backbone == "conv4"
    if method in ("svm", "ridge"):
        assert recipe.method_options == {} and recipe.train.shape == "5w5s5q"
    assert recipe.validation.shape == recipe.test_shape == "5w1s15q"


def test_the_maml_reference_check_trains_mamls_reference_network() -> None:
    name, overrides = gpu_check().method_recipe("maml-reference")
    recipe = load_recipe(recipe_path(name), overrides)
    assert recipe.method == "maml" and recipe.backbone == "conv4-strided"
    assert recipe.backbone_options == {"weight_init": "glorot", "bn_eps": 0.001, "tf_same_padding": True, "bn_scale": False}
    assert recipe.method_options["adapt_norms"] is False and recipe.method_options["initial_head"] == "normal"


def test_a_bf16_refusal_is_not_applicable_and_an_unavailable_runtime_is_no_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = gpu_check()
    refusal: dict[str, Any] = {"ok": False, "failed": "meta-train", "error": "error: precision bf16 is not supported by X", "returncode": 2}
    monkeypatch.setattr(module, "train", lambda *args, **kwargs: dict(refusal))
    assert module.check_bf16("protonet", "data.h5", 2, tmp_path, "cpu", {}) == {"ok": True, "not_applicable": refusal["error"]}
    crash = {**refusal, "error": "RuntimeError: something else", "returncode": 1}
    monkeypatch.setattr(module, "train", lambda *args, **kwargs: dict(crash))
    assert module.failed(module.check_bf16("protonet", "data.h5", 2, tmp_path, "cpu", {}))
    assert not module.failed({"ok": True, "not_applicable": "why"})
    assert not module.failed({"ok": False, "unavailable": "this onnxruntime has no CUDAExecutionProvider"})
    assert module.failed({"ok": False, "failed": "export", "error": "boom"})


def test_a_failure_is_reported_by_the_line_that_says_why() -> None:
    module = gpu_check()

    def error(stderr: str, stdout: str = "") -> str:
        return str(module.failure("step", subprocess.CompletedProcess([], 1, stdout, stderr))["error"])

    assert error("warming up\nerror: recipe key 'device': 'cuda' asked for\n") == "error: recipe key 'device': 'cuda' asked for"
    torchrun = "[rank0]: Traceback (most recent call last):\n[rank0]: RuntimeError: NCCL error\nChildFailedError: \n=====\n  rank : 0\n"
    assert error(torchrun) == "[rank0]: RuntimeError: NCCL error"  # the worker's, not the launcher's summary
    assert error("", "only this\n") == "only this" and error("") == "(no output)"
