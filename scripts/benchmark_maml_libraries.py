"""One MAML meta-step, fsltool against existing MAML libraries: seconds per meta-step and peak memory.

The step (PLATFORM.md's reference): 32 tasks of 5-way 1-shot with 15 queries per class, random 28x28 images,
5 inner SGD steps of lr 0.4 on the support cross-entropy, the query loss averaged over the tasks and
backpropagated (second order: through the inner steps; first order where the implementation has it), then one
Adam step. The network is the same module everywhere: fsltool's conv4-strided (4 x [conv 3x3 stride 2, BatchNorm,
ReLU], channels_last for the libraries, NCHW inside fsltool's per-task networks), feature maps averaged over space, a linear head. BatchNorm normalises every pass with its
own batch, queries included (transductive): that is what the libraries do with a module in train mode, so fsltool
runs with ``transductive_bn: true`` here; its default (queries normalised with the support statistics, computed in
one pass over support and queries) is timed as an extra row, and so are a smaller ``task_chunk`` (tasks per grouped
pass: less memory, more time) and other ``query_chunk`` values (tasks per grouped query pass). fsltool's two steps
(``method_options.step``): ``grouped`` (the default, tasks side by side) and ``lean`` (one task at a time).

Every case runs in a fresh subprocess: its peak memory is ru_maxrss at the end minus ru_maxrss after importing
torch and building the model and optimizer. fsltool's cases run with this interpreter; the libraries' with
``--side-python``, a separate virtual environment that holds them (never a project dependency):

    python -m venv /work/sidevenv
    /work/sidevenv/bin/pip install torch==2.13.0 && /work/sidevenv/bin/pip install --no-deps higher
    # learn2learn 0.2.0: its package __init__ imports torchvision, which has no build for this CPU torch here;
    # copy the sdist's learn2learn/ folder into the side venv's site-packages: the worker imports
    # learn2learn.algorithms.maml (the library's unmodified MAML class) without running that __init__.
    .venv/bin/python scripts/benchmark_maml_libraries.py --side-python /work/sidevenv/bin/python \\
        --json results/benchmark_maml_libraries.json --markdown results/benchmark_maml_libraries.md

A case that fails (its library not installed) is reported with its error. Each case's time is the median of its
``--repeats`` steps after ``--warmup`` steps, over ``--rounds`` interleaved rounds; its memory the largest peak.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # fsltool's network definition, also under the side environment's interpreter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fsltool.models.backbones import build_backbone  # noqa: E402
from fsltool.platform_tuning import tune_allocator  # noqa: E402

WAY, SHOT, QUERY, TASKS, INNER_STEPS, INNER_LR, OUTER_LR = 5, 1, 15, 32, 5, 0.4, 1e-3

# name -> (implementation, second order, runs under the side environment, fsltool's task_chunk and query_chunk,
# 0: the method's default)
CASES: dict[str, tuple[str, bool, bool, int, int]] = {
    "fsltool lean, 2nd order": ("fsltool-lean", True, False, 0, 0),
    "fsltool grouped, 2nd order": ("fsltool-grouped", True, False, 0, 0),
    "fsltool grouped, queries 1 task per pass, 2nd order": ("fsltool-grouped", True, False, 0, 1),
    "fsltool grouped, queries 2 tasks per pass, 2nd order": ("fsltool-grouped", True, False, 0, 2),
    "fsltool grouped by 2 tasks, 2nd order": ("fsltool-grouped", True, False, 2, 0),
    "fsltool grouped, 2nd order, support-statistics BN": ("fsltool-grouped-support-bn", True, False, 0, 0),
    "higher 0.2.1, 2nd order": ("higher", True, True, 0, 0),
    "learn2learn 0.2.0, 2nd order": ("learn2learn", True, True, 0, 0),
    "fsltool lean, 1st order": ("fsltool-lean", False, False, 0, 0),
    "fsltool grouped, 1st order": ("fsltool-grouped", False, False, 0, 0),
    "learn2learn 0.2.0, 1st order": ("learn2learn", False, True, 0, 0),
}


class Network(nn.Module):
    """The benchmark's network as a plain module (what a library wraps): backbone, spatial mean, linear head."""

    def __init__(self) -> None:
        super().__init__()
        # channels_last: the libraries' faster layout here (a one-off run in NCHW, fsltool's per-task layout, made
        # learn2learn relatively slower; docs/speed.md)
        self.backbone = build_backbone("conv4-strided", 1, [0.1], [0.3], flatten=False)
        self.head = nn.Linear(self.backbone.out_channels, WAY)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images).mean((-2, -1)))


def tasks(generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A meta-batch of random episodes: (support, support labels, query, query labels), class by class."""
    support_labels = torch.arange(WAY).repeat_interleave(SHOT)
    query_labels = torch.arange(WAY).repeat_interleave(QUERY)
    return [(torch.rand(WAY * SHOT, 1, 28, 28, generator=generator), support_labels,
             torch.rand(WAY * QUERY, 1, 28, 28, generator=generator), query_labels) for _ in range(TASKS)]


def fsltool_step(kind: str, second_order: bool, task_chunk: int, query_chunk: int) -> tuple[nn.Module, Callable[[list[Any]], None]]:
    from fsltool.data.episodes import Episode, EpisodeShape
    from fsltool.methods import build_method

    shape = EpisodeShape(WAY, SHOT, QUERY)
    options = {"way": WAY, "inner_steps": INNER_STEPS, "inner_lr": INNER_LR, "first_order": not second_order,
               "transductive_bn": kind != "fsltool-grouped-support-bn", "step": "lean" if kind == "fsltool-lean" else "grouped"}
    method = build_method("maml", build_backbone("conv4-strided", 1, [0.1], [0.3]), options)
    if task_chunk:
        method.task_chunk = task_chunk  # type: ignore[attr-defined]
    if query_chunk:
        method.query_chunk = query_chunk  # type: ignore[attr-defined]
    optimizer = torch.optim.Adam(method.parameters(), lr=OUTER_LR)

    def step(batch: list[Any]) -> None:
        outputs = method.meta_step([Episode(s, sl, q, ql, shape) for s, sl, q, ql in batch])
        optimizer.zero_grad(set_to_none=True)
        torch.stack([output.loss for output in outputs]).mean().backward()
        optimizer.step()

    return method.train(), step


def higher_step(second_order: bool) -> tuple[nn.Module, Callable[[list[Any]], None]]:
    """higher's documented MAML loop: innerloop_ctx over the module itself (copy_initial_weights=False, so the
    meta-gradient reaches it), a plain SGD inner optimizer, one backward per task."""
    import higher

    model = Network().train()
    inner = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    optimizer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)

    def step(batch: list[Any]) -> None:
        optimizer.zero_grad(set_to_none=True)
        for support, support_labels, query, query_labels in batch:
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False, track_higher_grads=second_order) as (fmodel, diffopt):
                for _ in range(INNER_STEPS):
                    diffopt.step(F.cross_entropy(fmodel(support), support_labels))
                (F.cross_entropy(fmodel(query), query_labels) / len(batch)).backward()
        optimizer.step()

    return model, step


def learn2learn_maml() -> type:
    """learn2learn's MAML class, imported without the package __init__ (which imports torchvision, data sets and
    gym wrappers the algorithm does not use)."""
    spec = importlib.util.find_spec("learn2learn")
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError("learn2learn")
    for name, path in (("learn2learn", list(spec.submodule_search_locations)),
                       ("learn2learn.algorithms", [str(Path(next(iter(spec.submodule_search_locations))) / "algorithms")])):
        package = types.ModuleType(name)
        package.__path__ = path
        sys.modules[name] = package
    return importlib.import_module("learn2learn.algorithms.maml").MAML


def learn2learn_step(second_order: bool) -> tuple[nn.Module, Callable[[list[Any]], None]]:
    """learn2learn's documented MAML loop: clone the wrapped module per task, adapt, backward the query loss."""
    model = Network().train()
    maml = learn2learn_maml()(model, lr=INNER_LR, first_order=not second_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=OUTER_LR)

    def step(batch: list[Any]) -> None:
        optimizer.zero_grad(set_to_none=True)
        for support, support_labels, query, query_labels in batch:
            learner = maml.clone()
            for _ in range(INNER_STEPS):
                learner.adapt(F.cross_entropy(learner(support), support_labels))
            (F.cross_entropy(learner(query), query_labels) / len(batch)).backward()
        optimizer.step()

    return model, step


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(name: str, warmup: int, repeats: int) -> dict[str, Any]:
    """In this (fresh) process: build, measure the baseline, time the steps."""
    kind, second_order, _, task_chunk, query_chunk = CASES[name]
    torch.manual_seed(0)
    if kind.startswith("fsltool"):
        _, step = fsltool_step(kind, second_order, task_chunk, query_chunk)
    elif kind == "higher":
        _, step = higher_step(second_order)
    else:
        _, step = learn2learn_step(second_order)
    baseline = peak_mib()
    generator = torch.Generator().manual_seed(0)
    times = []
    for repeat in range(warmup + repeats):
        batch = tasks(generator)
        start = time.perf_counter()
        step(batch)
        if repeat >= warmup:
            times.append(time.perf_counter() - start)
    return {"case": name, "seconds": statistics.median(times), "all_seconds": [round(t, 4) for t in times],
            "peak_mib": round(peak_mib() - baseline, 1), "baseline_mib": round(baseline, 1)}


def spawn(name: str, python: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [python, __file__, "--case", name, "--threads", str(args.threads), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats)] + (["--no-tuning"] if args.no_tuning else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"case": name, "error": last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def combine(name: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One case over all rounds: the median of all its timed steps, the largest peak."""
    failed = [result for result in results if "error" in result]
    if failed:
        return failed[0]
    steps = [seconds for result in results for seconds in result["all_seconds"]]
    return {"case": name, "seconds": round(statistics.median(steps), 4), "all_seconds": steps,
            "peak_mib": max(result["peak_mib"] for result in results), "baseline_mib": max(result["baseline_mib"] for result in results)}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| implementation | s / meta-step | peak memory above baseline |", "|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['case']} | not run: {row['error']} | |")
        else:
            lines.append(f"| {row['case']} | {row['seconds']:.3f} | {row['peak_mib']:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side-python", default=None, help="the interpreter of the environment that holds the libraries")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run the list of cases this many times, interleaved")
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    parser.add_argument("--no-tuning", action="store_true", help="glibc's default allocator settings")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # worker mode: one case, JSON on stdout
    args = parser.parse_args()
    if not args.no_tuning:
        tune_allocator()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case, args.warmup, args.repeats)))
        return
    names = [name for name in CASES if args.only in name]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(args.rounds):  # cases interleaved, so a drift in the machine's speed touches all of them alike
        for name in names:
            side = CASES[name][2]
            if side and not args.side_python:
                runs[name].append({"case": name, "error": "no --side-python"})
            else:
                runs[name].append(spawn(name, args.side_python if side else sys.executable, args))
            print(markdown(runs[name][-1:]).splitlines()[-1], flush=True)
    rows = [combine(name, results) for name, results in runs.items()]
    report = {"threads": args.threads, "torch": torch.__version__, "allocator_tuned": not args.no_tuning,
              "warmup": args.warmup, "repeats": args.repeats, "rounds": args.rounds, "step": {"way": WAY, "shot": SHOT, "query_per_class": QUERY,
              "tasks": TASKS, "inner_steps": INNER_STEPS, "inner_lr": INNER_LR, "outer": f"Adam {OUTER_LR}"}, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows))


if __name__ == "__main__":
    main()
