"""Inference speed of an exported model, three ways, in one process on one machine: PyTorch eager (the run's
method), TorchScript (the exported .ts files) and ONNX Runtime (the exported .onnx files, I/O-bound calls).

- embedding throughput (images/s) at batch 1 and batch 100;
- the latency of one whole episode (support + queries -> scores) at 5w1s15q and 20w5s15q.

    .venv/bin/python scripts/benchmark_runtime.py runs/omniglot/protonet-5w1s [--json results/benchmark_runtime.json]

Any trained run works (the demo's runs/synthetic/protonet-quick too): the figures depend on the network and the
image size, not the weights. Medians of repeated calls after warm-up; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmark import median_seconds  # scripts/benchmark.py: the same timing everywhere

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape, episode_labels
from fsltool.export import export_run
from fsltool.runtime import OnnxModel


def backends(run: str, export_dir: Path, device: str) -> dict[str, dict[str, Callable[..., object]]]:
    """For each runtime: an ``embed(images)`` and an ``episode(support, labels, query)`` callable on numpy input."""
    method = load_trained(run).method.eval()
    scripted = {name: torch.jit.load(str(export_dir / f"{name}.ts")).eval() for name in ("embedding", "classifier")}
    onnx = {name: OnnxModel(str(export_dir / f"{name}.onnx"), device) for name in ("embedding", "classifier")}

    def torch_call(module: Callable[..., torch.Tensor]) -> Callable[..., object]:
        def call(*arrays: np.ndarray) -> object:
            with torch.inference_mode():
                return module(*(torch.from_numpy(a) for a in arrays)).numpy()
        return call

    def onnx_call(model: OnnxModel, names: tuple[str, ...]) -> Callable[..., object]:
        return lambda *arrays: model.run(dict(zip(names, arrays)))[0]

    return {
        "PyTorch eager": {"embed": torch_call(method.embed), "episode": torch_call(method)},
        "TorchScript": {"embed": torch_call(scripted["embedding"]), "episode": torch_call(scripted["classifier"])},
        f"ONNX Runtime ({onnx['classifier'].provider})": {
            "embed": onnx_call(onnx["embedding"], ("images",)),
            "episode": onnx_call(onnx["classifier"], ("support", "support_labels", "query")),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained run folder or checkpoint")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="ONNX Runtime device")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    image_shape = load_trained(args.run).config["image_shape"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        export_run(args.run, folder, verify_episodes=0)
        runtimes = backends(args.run, Path(folder), args.device)
        results: dict[str, dict[str, float]] = {}
        for name, calls in runtimes.items():
            figures: dict[str, float] = {}
            for batch in (1, 100):
                images = rng.random((batch, *image_shape), dtype=np.float32)
                figures[f"embed batch {batch} (images/s)"] = batch / median_seconds(lambda: calls["embed"](images), args.repeats)
            for text in ("5w1s15q", "20w5s15q"):
                shape = EpisodeShape.parse(text)
                labels = episode_labels(shape)[0].numpy()
                support = rng.random((len(labels), *image_shape), dtype=np.float32)
                query = rng.random((shape.way * shape.query, *image_shape), dtype=np.float32)
                figures[f"episode {text} (ms)"] = 1000 * median_seconds(lambda: calls["episode"](support, labels, query), args.repeats)
            results[name] = figures
            print(name, json.dumps({k: round(v, 2) for k, v in figures.items()}), flush=True)

    eager, onnx_name = "PyTorch eager", next(name for name in results if name.startswith("ONNX"))
    speedup = results[onnx_name]["embed batch 100 (images/s)"] / results[eager]["embed batch 100 (images/s)"]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
        "image_shape": image_shape, "results": results, "onnx_over_eager_batch100": speedup,
    }
    print(f"ONNX Runtime / PyTorch eager embedding throughput at batch 100: {speedup:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
