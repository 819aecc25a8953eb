"""Seconds to score stored-test-set-sized evaluations with baseline / baseline++ (a head fitted per episode by the
reference protocol: 100 epochs of SGD in mini-batches of 4), from precomputed embeddings, as fsltool.evaluate calls
``scores_from_embeddings``: under inference_mode, in chunks of the CPU's ``work_sizes().score_elements``.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_baseline.py [--threads 1] [--episodes 600] [--dims 640,1600]

Random non-negative embeddings (post-ReLU features): the time does not depend on their values. The backbone's
embedding pass is not included (it is the same for every embedding method). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import torch

from fsltool.data.episodes import EpisodeShape, episode_labels
from fsltool.device import WORK_SIZES
from fsltool.methods import build_method
from fsltool.methods.baseline import BATCH_SIZE, EPOCHS
from fsltool.models import build_backbone


def evaluation_seconds(name: str, shape: EpisodeShape, episodes: int, dim: int) -> tuple[float, int]:
    """Wall seconds to score ``episodes`` episodes in evaluate's chunks, and the number of chunks."""
    method = build_method(name, build_backbone("conv4", 1, [0.0], [1.0], hidden=8), {}).eval()
    generator = torch.Generator().manual_seed(0)
    support_labels, _ = episode_labels(shape)
    support = torch.rand(episodes, len(support_labels), dim, generator=generator)
    query = torch.rand(episodes, shape.way * shape.query, dim, generator=generator)
    per_call = max(1, WORK_SIZES["cpu"].score_elements // (query.shape[1] * shape.way * dim))
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, episodes, per_call):
            chunk = support[i : i + per_call]
            method.scores_from_embeddings(chunk, support_labels.expand(len(chunk), -1), query[i : i + per_call], shape.way)
    return time.perf_counter() - start, -(-episodes // per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--dims", default="640,1600", help="embedding sizes (ResNet-12: 640, Conv-4 on 84x84: 1600)")
    parser.add_argument("--shapes", default="5w1s15q,5w5s15q")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for dim in (int(d) for d in args.dims.split(",")):
        for text in args.shapes.split(","):
            shape = EpisodeShape.parse(text)
            steps = EPOCHS * -(-shape.way * shape.shot // BATCH_SIZE)
            for name in ("baseline", "baseline++"):
                seconds, calls = evaluation_seconds(name, shape, args.episodes, dim)
                print(f"{name:10s} {shape} D={dim}: {args.episodes} episodes in {seconds:6.2f} s "
                      f"({calls} calls of {steps} SGD steps each)", flush=True)


if __name__ == "__main__":
    main()
