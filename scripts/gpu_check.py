"""Every check that needs a GPU, in one short run, for a session lent a GPU machine (fsltool itself never needs one).

For each method's built-in Omniglot 5w1s recipe: meta-train a few meta-steps with ``device=cuda`` (the loop, the
checkpoint, validation on the GPU), evaluate the run on stored test episodes on the GPU and on the CPU (they must
agree: same checkpoint, same episodes; float differences may flip a near-tie, so within 1 point), and record the
training speed from the run's own metrics.jsonl. Then, where ONNX Runtime has its CUDA provider, the runtime
benchmark on CUDA. Writes OUT/gpu_check.json and prints a markdown table; exits 1 if any check failed.

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


def check_method(method: str, data: str, steps: int, episodes: int, folder: Path, device: str) -> dict[str, Any]:
    run = folder / method
    began = time.perf_counter()
    trained = fsltool("meta-train", f"omniglot/{method}-5w1s", f"data={data}", f"output={run}", f"train.episodes={steps}",
                      f"train.log_every={max(1, steps // 2)}", f"validation.every={steps}", "validation.episodes=20",
                      f"device={device}", "--force", "-q")
    if trained.returncode:
        return failure("meta-train", trained)
    seconds = time.perf_counter() - began
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["phase"] == "train"]
    result: dict[str, Any] = {"train_seconds": round(seconds, 1), "episodes_per_s": train_rows[-1]["episodes_per_s"]}
    for where in ("device", "cpu"):
        began = time.perf_counter()
        evaluated = fsltool("evaluate", str(run), "--device", device if where == "device" else "cpu", "--episodes", str(episodes), "--json", "-", "-q")
        if evaluated.returncode:
            return {**result, **failure(f"evaluate on {where}", evaluated)}
        result[f"accuracy_{where}"] = json.loads(evaluated.stdout)["accuracy"]
        result[f"evaluate_{where}_s"] = round(time.perf_counter() - began, 1)
    result["ok"] = abs(result["accuracy_device"] - result["accuracy_cpu"]) <= 1.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/omniglot.h5")
    parser.add_argument("--out", default="gpu-check")
    parser.add_argument("--steps", type=int, default=20, help="meta-steps trained per method")
    parser.add_argument("--episodes", type=int, default=100, help="stored test episodes evaluated on each device")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda", help="where to train and evaluate (cpu: a dry run of this script)")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA device here; this script is for a GPU machine (--device cpu: a dry run)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    report: dict[str, Any] = {"device": args.device, "gpu": gpu, "torch": torch.__version__, "steps": args.steps,
                              "episodes": args.episodes, "methods": {}}
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods.split(","):
            report["methods"][method] = check_method(method, args.data, args.steps, args.episodes, Path(folder), args.device)
            print(method, json.dumps(report["methods"][method]), flush=True)
        import onnxruntime

        if args.device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            bench = subprocess.run([sys.executable, "scripts/benchmark_runtime.py", str(Path(folder) / "protonet"), "--device", "cuda",
                                    "--json", str(out / "benchmark_runtime_cuda.json")], capture_output=True, text=True)
            report["runtime_cuda"] = "ok" if bench.returncode == 0 else (bench.stderr.strip().splitlines() or ["failed"])[-1]
        else:
            report["runtime_cuda"] = "not run: no GPU asked for, or this onnxruntime has no CUDAExecutionProvider"
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"| method | train episodes/s ({args.device}) | accuracy {args.device} / cpu ({args.episodes} stored episodes) | check |")
    print("|---|---|---|---|")
    for method, row in report["methods"].items():
        if "failed" in row:
            print(f"| {method} | | | FAILED at {row['failed']}: {row['error']} |")
        else:
            print(f"| {method} | {row['episodes_per_s']:.1f} | {row['accuracy_device']:.2f} / {row['accuracy_cpu']:.2f} | {'ok' if row['ok'] else 'MISMATCH'} |")
    print("ONNX Runtime on CUDA:", report["runtime_cuda"])
    sys.exit(0 if all(row.get("ok") for row in report["methods"].values()) else 1)


if __name__ == "__main__":
    main()
