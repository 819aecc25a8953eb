"""Enrolled classifiers against the support-set classifier, both under ONNX Runtime on the CPU, in one process:

- prediction latency for one query image (ms) and throughput at a batch of 100 queries (images/s), with 5 and 100
  classes of ``--shot`` images: the enrolled graph (``fsltool enroll``: images -> scores, the kept state as
  constants) against the exported classifier (``fsltool export``: support + queries -> scores, the support set
  embedded again on every call, as ``fsltool predict MODEL SUPPORT QUERIES`` does);
- enrolment time per class: computing the kept state (embedding the class's images), and the whole enrolment
  (state, ONNX export checked under ONNX Runtime, TorchScript) divided by the classes.

    .venv/bin/python scripts/benchmark_enrolled.py runs/omniglot/protonet-5w1s [--json results/benchmark_enrolled.json]

Any trained run of an enrollable method works: the figures depend on the network, the image size and the number of
classes, not on the weights, so the images are random pixels. Medians of repeated calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmark import median_seconds  # scripts/benchmark.py: the same timing everywhere

from fsltool.checkpoint import load_trained
from fsltool.device import machine_description
from fsltool.enroll import class_states, enroll_images
from fsltool.export import export_run
from fsltool.runtime import OnnxModel


def speed(call: Callable[[np.ndarray], object], image_shape: list[int], repeats: int, rng: np.random.Generator) -> dict[str, float]:
    """Latency of one query and throughput at 100 queries of ``call(queries)``."""
    one, hundred = (rng.random((batch, *image_shape), dtype=np.float32) for batch in (1, 100))
    return {"1 image (ms)": 1000 * median_seconds(lambda: call(one), repeats),
            "batch 100 (images/s)": 100 / median_seconds(lambda: call(hundred), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained run folder or checkpoint of an enrollable method")
    parser.add_argument("--classes", default="5,100", help="enrolled class counts to measure")
    parser.add_argument("--shot", type=int, default=5, help="images per class")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    trained = load_trained(args.run)
    image_shape = trained.config["image_shape"]
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        export_run(trained.path, Path(folder) / "export", verify_episodes=0)
        support_set = OnnxModel(str(Path(folder) / "export" / "classifier.onnx"), "cpu")
        for count in (int(c) for c in args.classes.split(",")):
            images = {f"class-{c:04d}": rng.random((args.shot, *image_shape), dtype=np.float32) for c in range(count)}
            class_states(trained, dict([next(iter(images.items()))]))  # warm-up: the first call allocates
            start = time.perf_counter()
            class_states(trained, images)
            state_seconds = time.perf_counter() - start
            start = time.perf_counter()
            enroll_images(trained, images, Path(folder) / f"enrolled-{count}")
            enrol_seconds = time.perf_counter() - start
            enrolled = OnnxModel(str(Path(folder) / f"enrolled-{count}" / "classifier.onnx"), "cpu")
            support = np.concatenate(list(images.values()))
            labels = np.repeat(np.arange(count), args.shot)
            figures = {
                **{f"enrolled, {k}": v for k, v in speed(lambda q: enrolled.run({"images": q}), image_shape, args.repeats, rng).items()},
                **{f"support set, {k}": v for k, v in speed(
                    lambda q: support_set.run({"support": support, "support_labels": labels, "query": q}), image_shape, args.repeats, rng).items()},
                "state per class (ms)": 1000 * state_seconds / count,
                "whole enrolment per class (ms)": 1000 * enrol_seconds / count,
                "whole enrolment (s)": enrol_seconds,
            }
            results[f"{count} classes x {args.shot} images"] = figures
            print(f"{count} classes x {args.shot} images", json.dumps({k: round(v, 2) for k, v in figures.items()}), flush=True)

    report = {
        "command": " ".join([*(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" for _ in [0] if "OMP_NUM_THREADS" in os.environ),
                             Path(sys.executable).name, *sys.argv]),
        "machine": machine_description(torch.device("cpu"))
                   + f", {platform.system()}, load average {os.getloadavg()[0]:.2f} at the end",
        "method": trained.config["method"], "backbone": trained.config["backbone"], "image_shape": image_shape,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
        "provider": "CPUExecutionProvider", "results": results,
    }
    print(f"command: {report['command']}\nmachine: {report['machine']}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__} (its own thread pool)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
