"""Seconds per grouped meta-step (meta_step + backward + Adam) with the grouped network's feature maps in NCHW
against channels-last on a device (``TaskNetwork.layouts``: channels-last by default on the CPU only; passes
differentiated twice, MAML's second-order support passes, stay NCHW either way), for the cases of
scripts/benchmark_maml.py: random 28x28 episodes, conv4-strided.

    .venv/bin/python scripts/benchmark_grouped_layout.py [--device cpu] [--threads 1] [--repeats 5] [--rounds 2] [--json results/benchmark_grouped_layout.json]

The two layouts' steps alternate within one process (a machine whose load changes slows both alike); medians of
``--repeats`` steps per layout after one warm-up step each, in each of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmark_maml import CASES, case_method, interleaved_step_medians  # scripts/benchmark_maml.py: the same cases and timing
from fsltool.device import machine_description
from fsltool.platform_tuning import tune_allocator

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def step_seconds(case: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Medians per layout on ``device``, one method per layout (the same start)."""
    methods = []
    for layout in LAYOUTS.values():
        method = case_method(case).to(device)
        method.network.layouts = {device.type: layout}
        methods.append(method)
    return dict(zip(LAYOUTS, interleaved_step_medians(methods, case, repeats, device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="where the steps run (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for round_ in range(args.rounds):
        for case in CASES:
            if args.only not in case["name"]:
                continue
            seconds = step_seconds(case, args.repeats, device)
            speedup = seconds["nchw"] / seconds["channels_last"]
            rows.append({"round": round_ + 1, "case": case["name"], **{f"{k}_s": round(v, 4) for k, v in seconds.items()},
                         "channels_last_speedup": round(speedup, 2)})
            print(f"round {round_ + 1}  {case['name']:48s} NCHW {seconds['nchw']:6.3f} s   channels-last "
                  f"{seconds['channels_last']:6.3f} s   x{speedup:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"command": "scripts/benchmark_grouped_layout.py", "threads": args.threads, "repeats": args.repeats,
                       "machine": machine_description(device), "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
