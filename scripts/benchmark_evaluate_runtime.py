"""Evaluation through PyTorch against ONNX Runtime (``fsltool evaluate RUN --runtime torch|onnx``): the whole
evaluation of the stored test episodes (reading the images, building the runtime's copy of the embedding network,
embedding every distinct image once, scoring), the two runtimes alternating round by round so that a busy
machine slows both alike; then every episode's scores from both, compared.

    .venv/bin/python scripts/benchmark_evaluate_runtime.py runs/omniglot/protonet-pretrained-5w1s-euclidean \
        [--shape 5w1s15q] [--rounds 5] [--json results/benchmark_evaluate_runtime.json]

Any run of a method that embeds each image once works.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import onnxruntime
import torch

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape, episode_labels
from fsltool.data.store import FewShotData
from fsltool.device import machine_description
from fsltool.evaluate import RUNTIMES, episode_scores, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--shape", default=None, help="default: the run's test_shape")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()

    trained = load_trained(args.run)
    method = trained.method
    shape = EpisodeShape.parse(args.shape or trained.recipe.test_shape)
    seconds: dict[str, list[float]] = {runtime: [] for runtime in RUNTIMES}
    with FewShotData(trained.recipe.data) as data:
        for _ in range(args.rounds):
            for runtime in RUNTIMES:
                start = time.perf_counter()
                result = evaluate(method, data, "test", shape, runtime=runtime)
                seconds[runtime].append(round(time.perf_counter() - start, 3))
                print(f"{runtime:6s} {seconds[runtime][-1]:7.3f} s  accuracy {result.accuracy:.4f}", flush=True)
        support, query = data.stored_episodes("test", shape)
        scores = {runtime: episode_scores(method, data, shape, support, query, runtime) for runtime in RUNTIMES}
    torch_scores, onnx_scores = scores["torch"], scores["onnx"]
    predictions_torch, predictions_onnx = torch_scores.argmax(-1), onnx_scores.argmax(-1)
    query_labels = episode_labels(shape)[1]
    figures = {
        "run": args.run,
        "shape": str(shape),
        "episodes": len(support),
        "seconds": seconds,
        "median_s": {runtime: statistics.median(values) for runtime, values in seconds.items()},
        "max_abs_score_diff": float((torch_scores - onnx_scores).abs().max()),
        "max_abs_score": float(torch_scores.abs().max()),
        "episodes_with_a_different_prediction": int((predictions_torch != predictions_onnx).any(-1).sum()),
        "accuracy_torch": float((predictions_torch == query_labels).float().mean() * 100),
        "accuracy_onnx": float((predictions_onnx == query_labels).float().mean() * 100),
        "machine": machine_description(torch.device("cpu"))
                   + f", onnxruntime {onnxruntime.__version__}, load average {os.getloadavg()[0]:.1f} at the end",
    }
    ratio = figures["median_s"]["torch"] / figures["median_s"]["onnx"]
    print(json.dumps(figures, indent=2))
    print(f"median torch / onnx: {ratio:.2f}x; per round: "
          + ", ".join(f"{t / o:.2f}x" for t, o in zip(seconds["torch"], seconds["onnx"])))
    if args.json_out:
        with open(args.json_out, "w") as file:
            json.dump({**figures, "ratio_median": round(ratio, 3)}, file, indent=2)
            file.write("\n")


if __name__ == "__main__":
    main()
