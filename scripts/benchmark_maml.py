"""Seconds per meta-step of MAML / FOMAML / Reptile (meta_step + backward + Adam), a per-task loop against the
grouped meta-batch (all tasks as one network of grouped convolutions), on random 28x28 images, conv4-strided.

    .venv/bin/python scripts/benchmark_maml.py [--threads 1] [--repeats 3] [--json results/benchmark_maml.json]

Medians of ``--repeats`` steps after one warm-up step, in one process with the allocator setting the CLI uses.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from fsltool.data.episodes import Episode, EpisodeShape, episode_labels
from fsltool.methods import build_method
from fsltool.models import build_backbone
from fsltool.platform_tuning import tune_allocator

CASES: list[dict[str, Any]] = [
    # PLATFORM.md's reference measurement: 5-way 1-shot, 15 queries per class, 5 inner steps, 32 tasks.
    {"name": "maml 5w1s15q x32, 5 steps, 2nd order", "method": "maml", "shape": "5w1s15q", "tasks": 32,
     "options": {"inner_steps": 5, "inner_lr": 0.4}},
    {"name": "fomaml 5w1s15q x32, 5 steps", "method": "maml", "shape": "5w1s15q", "tasks": 32,
     "options": {"inner_steps": 5, "inner_lr": 0.4, "first_order": True}},
    # The shipped recipes' training steps.
    {"name": "maml-5w1s recipe: 5w1s1q x32, 1 step", "method": "maml", "shape": "5w1s1q", "tasks": 32, "options": {"inner_steps": 1}},
    {"name": "maml-20w1s recipe: 20w1s1q x16, 5 steps", "method": "maml", "shape": "20w1s1q", "tasks": 16,
     "options": {"inner_steps": 5, "inner_lr": 0.1}},
    {"name": "reptile-5w1s recipe: 5w1s9q x5, 5 x batch 10", "method": "reptile", "shape": "5w1s9q", "tasks": 5, "options": {}},
    {"name": "reptile-20w1s recipe: 20w1s9q x5, 10 x batch 20", "method": "reptile", "shape": "20w1s9q", "tasks": 5,
     "options": {"inner_steps": 10, "inner_batch": 20, "inner_lr": 0.0005}},
]


def episodes(shape: EpisodeShape, tasks: int, generator: torch.Generator) -> list[Episode]:
    support_labels, query_labels = episode_labels(shape)
    return [Episode(torch.rand(len(support_labels), 1, 28, 28, generator=generator), support_labels,
                    torch.rand(len(query_labels), 1, 28, 28, generator=generator), query_labels, shape) for _ in range(tasks)]


def interleaved_step_medians(methods: list[Any], case: dict[str, Any], repeats: int, device: torch.device = torch.device("cpu")) -> list[float]:
    """Median seconds of ``repeats`` meta-steps (meta_step + backward + Adam, after one warm-up) of each method (on
    ``device``) on the case's random episodes, the methods' steps interleaved (so a machine whose load changes during
    the run slows them alike); on a GPU each step is timed to its end (synchronized)."""
    shape = EpisodeShape.parse(case["shape"])
    runs = [(method, torch.optim.Adam(method.parameters(), lr=1e-3), torch.Generator().manual_seed(0), []) for method in methods]
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for repeat in range(repeats + 1):
        for method, optimizer, generator, times in runs:
            batch = [episode.to(device) for episode in episodes(shape, case["tasks"], generator)]
            synchronize()
            start = time.perf_counter()
            outputs = method.meta_step(batch)
            optimizer.zero_grad(set_to_none=True)
            torch.stack([output.loss for output in outputs]).mean().backward()
            optimizer.step()
            synchronize()
            if repeat:  # the first is a warm-up
                times.append(time.perf_counter() - start)
    return [statistics.median(run[3]) for run in runs]


def case_method(case: dict[str, Any]) -> Any:
    """The case's method on a conv4-strided, from seed 0."""
    torch.manual_seed(0)
    shape = EpisodeShape.parse(case["shape"])
    return build_method(case["method"], build_backbone("conv4-strided", 1, [0.1], [0.3]), {"way": shape.way, **case["options"]})


def step_seconds(case: dict[str, Any], repeats: int) -> tuple[float, float]:
    """Medians for the per-task loop and the grouped meta-batch."""
    methods = []
    for group_tasks in (False, True):
        method = case_method(case)
        method.group_tasks = group_tasks
        methods.append(method)
    per_task, grouped = interleaved_step_medians(methods, case, repeats)
    return per_task, grouped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    rows = []
    for case in CASES:
        if args.only not in case["name"]:
            continue
        loop, grouped = step_seconds(case, args.repeats)
        rows.append({"case": case["name"], "per_task_s": round(loop, 4), "grouped_s": round(grouped, 4), "speedup": round(loop / grouped, 2)})
        print(f"{case['name']:48s} per-task {loop:7.3f} s   grouped {grouped:7.3f} s   x{loop / grouped:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
