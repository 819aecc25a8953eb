"""The C allocator setting the CLI applies (fsltool/platform_tuning.py) side by side with the alternatives (issue 18),
on the ProtoNet Conv-4 60w5s5q training step, each measurement in a fresh child process, settings alternating
round by round:

- the step alone (scripts/benchmark.py's: sample, forward, backward, Adam) under each SETTINGS entry: median
  seconds, and the minor page faults per step (what the setting changes, and, unlike seconds, not the machine's load:
  memory unmapped when freed is faulted in again on the next step);
- the CLI's own training step: `fsltool meta-train omniglot/protonet-5w5s` as a user runs it (the console script),
  seconds per meta-step from its metrics.jsonl (the second log window: warmed up), under each CLI_SETTINGS entry.

    .venv/bin/python scripts/benchmark_allocator.py --data data/omniglot.h5 [--rounds 3] [--json results/benchmark_allocator.json]

Compare the figures within one run (ratios of medians over rounds): shared machines drift between runs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

TUNABLES = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}  # glibc's start-up spelling
GLIBC_TUNABLES = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"}


def previous_mallopt() -> None:
    """What fsltool applied before: a 32 MiB mmap threshold (all older glibc accepts) and a 1 GiB trim threshold."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 * 2**20)
    libc.mallopt(-1, 2**30)


def fsltool_setting() -> None:
    from fsltool.platform_tuning import tune_allocator

    tune_allocator()


# name -> (environment of the child, what the child applies in-process before measuring)
SETTINGS: dict[str, tuple[dict[str, str], Callable[[], None] | None]] = {
    "none (glibc defaults)": ({}, None),
    "mallopt 32 MiB mmap threshold (previous)": ({}, previous_mallopt),
    "MALLOC_*_ tunables 4 GiB": (TUNABLES, None),
    "GLIBC_TUNABLES 4 GiB": (GLIBC_TUNABLES, None),
    "fsltool's tune_allocator()": ({}, fsltool_setting),
}
# name -> (environment, fsltool's global options)
CLI_SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "fsltool meta-train": ({}, []),
    "MALLOC_*_ tunables 4 GiB, fsltool --no-tuning meta-train": (TUNABLES, ["--no-tuning"]),
    "fsltool --no-tuning meta-train": ({}, ["--no-tuning"]),
}


def step_child(setting: str, data: str, repeats: int) -> dict[str, float]:
    """In the child: apply ``setting``, then the median training step and the page faults per step (after 2 warm-up
    steps)."""
    apply = SETTINGS[setting][1]
    if apply is not None:
        apply()
    from benchmark import median_seconds, train_step  # scripts/benchmark.py: the same step everywhere

    from fsltool.data.episodes import EpisodeShape
    from fsltool.data.store import FewShotData

    with FewShotData(data) as store:
        step = train_step(store, EpisodeShape.parse("60w5s5q"), channels_last=True)
        for _ in range(2):
            step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = median_seconds(step, repeats, warmup=0)
        return {"step_s": seconds, "minor_faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats}


def child_environment(extra: dict[str, str], threads: int) -> dict[str, str]:
    """This process's environment without any allocator setting of its own, plus ``extra``."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}
    return {**environ, "OMP_NUM_THREADS": str(threads), **extra}


def measure_step(setting: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", setting, "--data", args.data, "--repeats", str(args.repeats)]
    result = subprocess.run(command, env=child_environment(SETTINGS[setting][0], args.threads), check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_cli(setting: str, args: argparse.Namespace) -> float:
    environ, options = CLI_SETTINGS[setting]
    fsltool = Path(sys.executable).parent / "fsltool"
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([str(fsltool), *options, "meta-train", "omniglot/protonet-5w5s", f"data={args.data}", f"output={folder}/run",
                        f"train.episodes={2 * args.cli_steps}", f"train.log_every={args.cli_steps}", "train.keep_checkpoints=0",
                        "validation.every=1000000", "validation.episodes=1", "-q"],
                       env=child_environment(environ, args.threads), check=True, capture_output=True)
        rows = [json.loads(line) for line in Path(folder, "run", "metrics.jsonl").read_text().splitlines()]
    return 1 / [row for row in rows if row["phase"] == "train"][1]["episodes_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/omniglot.h5")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per child (after 2 warm-up ones)")
    parser.add_argument("--cli-steps", type=int, default=10, help="meta-steps per log window of the CLI runs (two windows, the second timed)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every child")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step_child(args.child, args.data, args.repeats)))
        return
    rounds: dict[str, list[float]] = {name: [] for name in [*SETTINGS, *CLI_SETTINGS]}
    faults: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for number in range(args.rounds):
        for setting in SETTINGS:
            measured = measure_step(setting, args)
            rounds[setting].append(round(measured["step_s"], 4))
            faults[setting].append(round(measured["minor_faults_per_step"]))
        for setting in CLI_SETTINGS:
            rounds[setting].append(round(measure_cli(setting, args), 4))
        print(f"round {number + 1}: " + json.dumps({name: values[-1] for name, values in rounds.items()}), file=sys.stderr)
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    best_step, best_cli = min(medians[name] for name in SETTINGS), min(medians[name] for name in CLI_SETTINGS)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s), "
                   f"glibc {platform.libc_ver()[1]}, load average {os.getloadavg()[0]:.1f} at the end",
        "data": args.data, "rounds": rounds, "minor_faults_per_step": faults,
        "median_s": {name: round(value, 4) for name, value in medians.items()},
        "step_over_best": {name: round(medians[name] / best_step, 3) for name in SETTINGS},
        "cli_step_over_best": {name: round(medians[name] / best_cli, 3) for name in CLI_SETTINGS},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
