"""Every check that needs a GPU, in one short run, for a session lent a GPU machine (fsltool itself never needs one).

For each method's built-in Omniglot 5w1s recipe: meta-train a few meta-steps with ``device=cuda`` and the image
array kept on the GPU (``data_on_device=true``: the loop, the checkpoint, validation on the GPU), evaluate the run on
stored test episodes on the GPU and on the CPU (they must agree: same checkpoint, same episodes; float differences may
flip a near-tie, so within 1 point), and record the training speed from the run's own metrics.jsonl. ProtoNet is
trained once more with the images kept on the host (``data_on_device=false``: uint8 episodes assembled in pinned
memory on the prefetch thread and copied on its own CUDA stream). Then the ProtoNet run is exported and verified
under ONNX Runtime on the same device (provider options, I/O binding on ``cuda:N``), and the runtime benchmark
compares ONNX Runtime with PyTorch on that device. Writes OUT/gpu_check.json and prints a markdown table; exits 1 if
any check failed. ``--device cpu`` is a dry run of all of it on the CPU (tests/test_gpu_check.py runs one).

    PYTHONPATH=. python3 scripts/gpu_check.py --data data/omniglot.h5 --out "$OUT"     # about 5-10 minutes

The device machines hold torch, h5py, click, rich, pyyaml and onnxruntime already; carry data/omniglot.h5
(prepared here: `fsltool prepare omniglot ../shared/data/omniglot data/omniglot.h5`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("protonet", "relationnet", "matchingnet", "maml", "fomaml", "reptile", "snail", "mann")


def fsltool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsltool", *args], capture_output=True, text=True)


def failure(step: str, done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = (done.stderr.strip() or done.stdout.strip() or "(no output)").splitlines()
    return {"ok": False, "failed": step, "error": lines[-1]}


def train(method: str, data: str, steps: int, run: Path, device: str, data_on_device: str) -> dict[str, Any]:
    """Meta-train a few steps: the speed from the run's metrics, or the failure."""
    began = time.perf_counter()
    trained = fsltool("meta-train", f"omniglot/{method}-5w1s", f"data={data}", f"output={run}", f"train.episodes={steps}",
                      f"train.log_every={max(1, steps // 2)}", f"validation.every={steps}", "validation.episodes=20",
                      f"device={device}", f"data_on_device={data_on_device}", "--force", "-q")
    if trained.returncode:
        return failure("meta-train", trained)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["phase"] == "train"]
    return {"ok": True, "train_seconds": round(time.perf_counter() - began, 1), "episodes_per_s": train_rows[-1]["episodes_per_s"]}


def check_method(method: str, data: str, steps: int, episodes: int, folder: Path, device: str) -> dict[str, Any]:
    run = folder / method
    result = train(method, data, steps, run, device, "true")
    if not result["ok"]:
        return result
    for where in ("device", "cpu"):
        began = time.perf_counter()
        evaluated = fsltool("evaluate", str(run), "--device", device if where == "device" else "cpu", "--episodes", str(episodes), "--json", "-", "-q")
        if evaluated.returncode:
            return {**result, **failure(f"evaluate on {where}", evaluated)}
        result[f"accuracy_{where}"] = json.loads(evaluated.stdout)["accuracy"]
        result[f"evaluate_{where}_s"] = round(time.perf_counter() - began, 1)
    result["ok"] = abs(result["accuracy_device"] - result["accuracy_cpu"]) <= 1.0
    return result


def check_export(run: Path, folder: Path, device: str) -> dict[str, Any]:
    """Export the run and verify it under ONNX Runtime on ``device``: it must run there and agree with PyTorch."""
    exported = fsltool("export", str(run), "--out", str(folder / "export"), "--device", device, "--verify-episodes", "20", "--json")
    if exported.returncode:
        return failure("export", exported)
    check = json.loads(exported.stdout)["verification"]
    on_device = (check["provider"] == "CUDAExecutionProvider") == device.startswith("cuda")
    return {"ok": on_device and check["agreement"] >= 0.999, "provider": check["provider"], "agreement": check["agreement"]}


def check_runtime(run: Path, out: Path, device: str, repeats: int) -> dict[str, Any]:
    """ONNX Runtime against PyTorch, both on ``device`` (scripts/benchmark_runtime.py)."""
    path = out / f"benchmark_runtime_{device.replace(':', '')}.json"
    bench = subprocess.run([sys.executable, str(Path(__file__).parent / "benchmark_runtime.py"), str(run), "--device", device,
                            "--repeats", str(repeats), "--json", str(path)], capture_output=True, text=True)
    if bench.returncode:
        return failure("benchmark_runtime", bench)
    report = json.loads(path.read_text())
    failed = [name for name, figures in report["results"].items() if "error" in figures]
    return {"ok": not failed, "failed_runtimes": failed, "onnx_over_eager_batch100": report["onnx_over_eager_batch100"],
            "results": report["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/omniglot.h5")
    parser.add_argument("--out", default="gpu-check")
    parser.add_argument("--steps", type=int, default=20, help="meta-steps trained per method")
    parser.add_argument("--episodes", type=int, default=100, help="stored test episodes evaluated on each device")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda", help="where to train and evaluate (cpu: a dry run of this script)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per runtime benchmark figure")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA device here; this script is for a GPU machine (--device cpu: a dry run)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None
    report: dict[str, Any] = {"device": args.device, "gpu": gpu, "torch": torch.__version__, "steps": args.steps,
                              "episodes": args.episodes, "methods": {}}
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods.split(","):
            report["methods"][method] = check_method(method, args.data, args.steps, args.episodes, Path(folder), args.device)
            print(method, json.dumps(report["methods"][method]), flush=True)
        protonet = Path(folder) / "protonet"
        report["checks"] = {"protonet, images on the host": train("protonet", args.data, args.steps, Path(folder) / "host", args.device, "false")}
        if report["methods"].get("protonet", {}).get("ok"):
            report["checks"]["export verified under ONNX Runtime"] = check_export(protonet, Path(folder), args.device)
            report["checks"]["ONNX Runtime vs PyTorch, same device"] = check_runtime(protonet, out, args.device, args.repeats)
        for name, row in report["checks"].items():
            print(name, json.dumps(row), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"| method | train episodes/s ({args.device}) | accuracy {args.device} / cpu ({args.episodes} stored episodes) | check |")
    print("|---|---|---|---|")
    for method, row in report["methods"].items():
        if "failed" in row:
            print(f"| {method} | | | FAILED at {row['failed']}: {row['error']} |")
        else:
            print(f"| {method} | {row['episodes_per_s']:.1f} | {row['accuracy_device']:.2f} / {row['accuracy_cpu']:.2f} | {'ok' if row['ok'] else 'MISMATCH'} |")
    for name, row in report["checks"].items():
        print(f"{name}: {'ok' if row['ok'] else 'FAILED'}", row.get("error", ""))
    sys.exit(0 if all(row.get("ok") for row in [*report["methods"].values(), *report["checks"].values()]) else 1)


if __name__ == "__main__":
    main()
