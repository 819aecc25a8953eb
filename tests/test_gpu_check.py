"""scripts/gpu_check.py's dry run on the CPU: every step a GPU session will run (training with the images kept on the
device and with them on the host, evaluation on both devices, export verified under ONNX Runtime on the device,
the runtime benchmark on one device) runs here too, so the script a GPU machine gets is known to work end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fsltool.data.episodes import EpisodeShape
from fsltool.data.pack import EpisodePlan, pack
from fsltool.data.sources.synthetic import synthetic

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    data = tmp_path / "glyphs.h5"  # the omniglot/protonet-5w1s recipe's shapes: 60-way training, stored 5w1s15q
    pack(synthetic(classes=110, images_per_class=16), data, EpisodePlan(shapes=(EpisodeShape(5, 1, 15),), episodes=10), quiet=True)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--methods", "protonet",
                           "--steps", "2", "--episodes", "5", "--repeats", "1", "--data", str(data), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["methods"]["protonet"]["ok"] and report["methods"]["protonet"]["accuracy_device"] == report["methods"]["protonet"]["accuracy_cpu"]
    checks = report["checks"]
    assert checks["protonet, images on the host"]["ok"]
    assert checks["export verified under ONNX Runtime"]["provider"] == "CPUExecutionProvider"
    runtime = checks["ONNX Runtime vs PyTorch, same device"]
    assert runtime["ok"] and runtime["failed_runtimes"] == [] and runtime["onnx_over_eager_batch100"] > 0
    assert json.loads((out / "benchmark_runtime_cpu.json").read_text())["device"] == "cpu"
