"""Inference speed of an exported model, three ways, in one process on one machine and on ONE device: PyTorch eager
(the run's method), TorchScript (the exported .ts files) and ONNX Runtime (the exported .onnx files, I/O-bound calls),
all on the CPU or all on the same GPU (``--device cuda:N``), never a GPU against the CPU. Every call takes numpy
arrays and returns numpy arrays, so each runtime pays the same copies to and from the device.

- embedding throughput (images/s) at batch 1 and batch 100;
- the latency of one whole episode (support + queries -> scores) at 5w1s15q and 20w5s15q.

    .venv/bin/python scripts/benchmark_runtime.py runs/omniglot/protonet-5w1s [--device cuda:0] [--json results/benchmark_runtime.json]

Any trained run works (the demo's runs/synthetic/protonet-quick too): the figures depend on the network and the
image size, not the weights. Medians of repeated calls after warm-up; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from benchmark import median_seconds  # scripts/benchmark.py: the same timing everywhere

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape, episode_labels
from fsltool.device import machine_description, prepare_device, resolve_device
from fsltool.export import export_run
from fsltool.runtime import OnnxModel


def backends(run: str, export_dir: Path, device: torch.device) -> dict[str, dict[str, Callable[..., object]]]:
    """For each runtime on ``device``: an ``embed(images)`` and an ``episode(support, labels, query)`` callable on
    numpy input. Exits when ONNX Runtime cannot run where PyTorch does (a comparison across devices says nothing)."""
    method = load_trained(run).method.eval().to(device)
    scripted = {name: torch.jit.load(str(export_dir / f"{name}.ts"), map_location=device).eval() for name in ("embedding", "classifier")}
    ort_device = "cpu" if device.type == "cpu" else f"cuda:{device.index}"
    onnx = {name: OnnxModel(str(export_dir / f"{name}.onnx"), ort_device) for name in ("embedding", "classifier")}
    if (onnx["classifier"].device, onnx["classifier"].device_id) != (device.type, device.index or 0):
        raise SystemExit(f"error: ONNX Runtime runs on {onnx['classifier'].provider}, PyTorch on {device}: "
                         "this onnxruntime cannot run on that device, and a comparison across devices says nothing")

    def torch_call(module: Callable[..., torch.Tensor]) -> Callable[..., object]:
        def call(*arrays: np.ndarray) -> object:
            with torch.inference_mode():
                return module(*(torch.from_numpy(a).to(device) for a in arrays)).cpu().numpy()
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


def measure(calls: dict[str, Callable[..., object]], image_shape: list[int], repeats: int, rng: np.random.Generator) -> dict[str, Any]:
    """One runtime's embedding throughput at batch 1 and 100 and its latency on a 5-way and a 20-way episode."""
    figures: dict[str, Any] = {}
    for batch in (1, 100):
        images = rng.random((batch, *image_shape), dtype=np.float32)
        figures[f"embed batch {batch} (images/s)"] = batch / median_seconds(lambda: calls["embed"](images), repeats)
    for text in ("5w1s15q", "20w5s15q"):
        shape = EpisodeShape.parse(text)
        labels = episode_labels(shape)[0].numpy()
        support = rng.random((len(labels), *image_shape), dtype=np.float32)
        query = rng.random((shape.way * shape.query, *image_shape), dtype=np.float32)
        figures[f"episode {text} (ms)"] = 1000 * median_seconds(lambda: calls["episode"](support, labels, query), repeats)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained run folder or checkpoint")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="where every runtime runs: cpu | cuda | cuda:N | auto")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--export", default=None, help="the run's export folder (fsltool export) to time, instead of exporting it again")
    args = parser.parse_args()

    device = resolve_device(args.device, "--device")
    prepare_device(device, repeating_shapes=False)  # fp32 as fp32 (no TF32), as ONNX Runtime's session runs it
    image_shape = load_trained(args.run).config["image_shape"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        if args.export is None:
            export_run(args.run, folder, verify_episodes=0)
        runtimes = backends(args.run, Path(args.export or folder), device)
        results: dict[str, dict[str, Any]] = {}
        for name, calls in runtimes.items():
            try:
                results[name] = measure(calls, image_shape, args.repeats, rng)
            except RuntimeError as error:  # e.g. a traced graph with a device baked in; the other runtimes still count
                results[name] = {"error": str(error).strip().splitlines()[0]}
            print(name, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results[name].items()}), flush=True)

    eager, onnx_name = "PyTorch eager", next(name for name in results if name.startswith("ONNX"))
    throughput = [results[name].get("embed batch 100 (images/s)") for name in (onnx_name, eager)]
    speedup = throughput[0] / throughput[1] if None not in throughput else None
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_description(torch.device("cpu")) + f", {platform.system()}",
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
        "image_shape": image_shape, "results": results, "onnx_over_eager_batch100": speedup,
    }
    print(f"ONNX Runtime / PyTorch eager embedding throughput at batch 100 on {device}: "
          + (f"{speedup:.2f}x" if speedup is not None else "not measured (a runtime failed)"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
