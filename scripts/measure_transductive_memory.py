"""Peak resident memory of `evaluate --transductive`'s scoring loop (fsltool.evaluate.query_batch_scores) on a run's
stored episodes, under the CLI's allocator setting, optionally handing freed memory back to the OS after each
episode (glibc malloc_trim): a peak that the trim lowers is memory the heap keeps, not live tensors. It found the
evaluation loops' heap growth (docs/speed.md, "The C allocator"): 1.28 GB before the fix, 633 MiB after.

    OMP_NUM_THREADS=1 python scripts/measure_transductive_memory.py runs/omniglot/relationnet-5w1s-trainval-20k --shape 20w1s [--trim]
"""

from __future__ import annotations

import argparse
import ctypes
import threading
import time

import torch

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.evaluate import query_batch_scores
from fsltool.platform_tuning import tune_allocator


def resident_kib() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder or checkpoint")
    parser.add_argument("--shape", default="20w1s")
    parser.add_argument("--checkpoint", default="last", choices=["best", "last"])
    parser.add_argument("--episodes", type=int, default=None, help="the first N stored episodes (default all)")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each episode's scores")
    args = parser.parse_args()
    tune_allocator()
    run = load_trained(f"{args.run}/checkpoints/{args.checkpoint}.pt" if not args.run.endswith(".pt") else args.run)
    if args.trim:
        trim, scores = ctypes.CDLL("libc.so.6").malloc_trim, type(run.method).scores_from_embeddings
        type(run.method).scores_from_embeddings = lambda self, *a: (scores(self, *a), trim(0))[0]  # the scored copy's class
    peak = [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], resident_kib())
            time.sleep(1)

    threading.Thread(target=sample, daemon=True).start()
    shape, start = EpisodeShape.parse(args.shape), time.perf_counter()
    with FewShotData(run.recipe.data) as data:
        support, query = (a[: args.episodes] for a in data.stored_episodes("test", shape))
        query_batch_scores(run.method, data, shape, support, query)
    print(f"{args.run} {shape} trim={args.trim}: peak {max(peak[0], resident_kib()) / 1024:.0f} MiB, "
          f"{time.perf_counter() - start:.0f} s, torch {torch.__version__}")


if __name__ == "__main__":
    main()
