"""Speed and memory of natural-image training at 84x84 (issue: natural images), each configuration in its own
child process so its peak memory is its own:

- ProtoNet with Conv-4 (flattened, 1600-d) and ResNet-12 at 5w1s15q and 5w5s15q: seconds per training step of
  fsltool's training loop (`meta_train`, its own metrics.jsonl, validation excluded) against the same step written as
  a plain PyTorch loop (sample indices, gather images, one backbone pass, prototypes, cross-entropy, Adam) on the
  same data file, alternating rounds (which side goes first alternates too), each in a fresh process with the
  allocator settings of fsltool's commands; the peak resident memory of each;
- seconds to evaluate the 600 stored test episodes of each shape (`fsltool.evaluate`, embedding each image once);
- first-order MAML with ResNet-12, 5w1s: seconds per meta-step and peak memory.

    .venv/bin/python scripts/benchmark_natural.py --data data/synthetic-rgb84.h5 [--json results/benchmark_natural.json]
        [--backbones conv4 --fomaml-steps 0 --steps 10 --rounds 3]   (the Conv-4 rows alone, longer windows)
        [--backbones resnet12 --fomaml-steps 0 --no-evaluation]   (the ResNet-12 steps alone)
    (the data file: fsltool prepare synthetic data/synthetic-rgb84.h5 --colour --size 84 --classes 300 --shapes 5w1s,5w5s)

Compare figures within one run (ratios): machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BACKBONES = {"conv4": {}, "resnet12": {}}
SHAPES = ("5w1s15q", "5w5s15q")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fsltool_steps(data: str, backbone: str, shape: str, steps: int) -> dict[str, float]:
    """fsltool's own loop: seconds per step from its metrics (the second log window: warmed up)."""
    from fsltool.recipe import Recipe, TrainConfig, ValidationConfig
    from fsltool.train import meta_train

    with tempfile.TemporaryDirectory() as folder:
        recipe = Recipe(data=data, output=f"{folder}/run", backbone=backbone, seed=0,
                        train=TrainConfig(shape=shape, episodes=2 * steps, log_every=steps, lr_step=0, keep_checkpoints=0),
                        validation=ValidationConfig(shape="5w1s15q", every=10**6, episodes=1), test_shape="5w1s15q")
        meta_train(recipe, quiet=True)
        rows = [json.loads(line) for line in Path(f"{folder}/run/metrics.jsonl").read_text().splitlines()]
    speed = [row for row in rows if row["phase"] == "train"][1]["episodes_per_s"]
    return {"step_s": 1 / speed, "peak_mib": _peak_mib()}


def plain_steps(data: str, backbone: str, shape: str, steps: int) -> dict[str, float]:
    """The same step as a plain PyTorch loop, on the same file and the same backbone module."""
    from fsltool.data.episodes import EpisodeShape
    from fsltool.data.store import FewShotData
    from fsltool.models import build_backbone

    parsed = EpisodeShape.parse(shape)
    with FewShotData(data) as store:
        torch.manual_seed(0)
        network = build_backbone(backbone, store.image_shape[0], store.mean, store.std, image_size=store.image_shape[-1])
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        sampler = store.sampler("train", parsed, torch.Generator().manual_seed(1))
        support_labels = torch.arange(parsed.way).repeat_interleave(parsed.shot)
        query_labels = torch.arange(parsed.way).repeat_interleave(parsed.query)
        times = []
        for _ in range(2 * steps):
            start = time.perf_counter()
            support, query = sampler.sample()
            images = store.images(torch.cat([support, query]))
            features = network(images)
            prototypes = torch.stack([features[: len(support)][support_labels == c].mean(0) for c in range(parsed.way)])
            loss = F.cross_entropy(-torch.cdist(features[len(support):], prototypes).pow(2), query_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    # the mean over the second window, as fsltool's logged episodes_per_s is (a median would drop the slow steps
    # that the fsltool side's window includes)
    return {"step_s": statistics.fmean(times[steps:]), "peak_mib": _peak_mib()}


def evaluation(data: str, backbone: str, shape: str) -> dict[str, float]:
    from fsltool.data.episodes import EpisodeShape
    from fsltool.data.store import FewShotData
    from fsltool.evaluate import evaluate
    from fsltool.methods import build_method
    from fsltool.models import build_backbone

    with FewShotData(data) as store:
        torch.manual_seed(0)
        method = build_method("protonet", build_backbone(backbone, store.image_shape[0], store.mean, store.std,
                                                         image_size=store.image_shape[-1]), {}).eval()
        start = time.perf_counter()
        evaluate(method, store, "test", EpisodeShape.parse(shape))
        return {"evaluate_600_s": time.perf_counter() - start, "peak_mib": _peak_mib()}


def fomaml_resnet12(data: str, steps: int) -> dict[str, float]:
    """First-order MAML, ResNet-12, 5w1s: the miniImageNet recipe's settings, ``steps`` timed meta-steps."""
    from fsltool.builtin_recipes import find_recipe
    from fsltool.recipe import load_recipe
    from fsltool.train import meta_train

    with tempfile.TemporaryDirectory() as folder:
        recipe = load_recipe(find_recipe("miniimagenet/fomaml-resnet12-5w1s").path, [
            f"data={data}", f"output={folder}/run", f"train.episodes={2 * steps}", f"train.log_every={steps}",
            "validation.every=1000000", "validation.episodes=1", "validation.shape=5w1s15q", "train.keep_checkpoints=0"])
        meta_train(recipe, quiet=True)
        rows = [json.loads(line) for line in Path(f"{folder}/run/metrics.jsonl").read_text().splitlines()]
    speed = [row for row in rows if row["phase"] == "train"][1]["episodes_per_s"]
    return {"meta_step_s": 1 / speed, "meta_batch": recipe.train.meta_batch, "peak_mib": _peak_mib()}


def _tuned(function: Any, *args: Any) -> dict[str, float]:
    """``function`` under the allocator settings every fsltool command runs with (fsltool.platform_tuning)."""
    from fsltool.platform_tuning import tune_allocator

    tune_allocator()
    return function(*args)


def in_child(function: Any, *args: Any) -> dict[str, float]:
    """Run ``function`` in a fresh process, allocator tuned as the CLI's: its own peak memory, no warm caches from
    the other side."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_tuned, (function, *args))


def alternating_round(index: int, *sides: tuple[Any, ...]) -> list[dict[str, float]]:
    """One measurement of each side, in children, the side that goes first alternating between rounds; results
    in the order given."""
    order = list(range(len(sides)))[:: 1 if index % 2 == 0 else -1]
    results = {i: in_child(*sides[i]) for i in order}
    return [results[i] for i in range(len(sides))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synthetic-rgb84.h5")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (as many again warm up)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating fsltool / plain rounds per configuration")
    parser.add_argument("--fomaml-steps", type=int, default=2, help="0: leave the first-order MAML row out")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated: which backbones' rows to run")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: which episode shapes' rows to run")
    parser.add_argument("--no-evaluation", action="store_true", help="leave out the 600-episode evaluation timings")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from fsltool.device import machine_description
    report: dict[str, Any] = {
        "machine": machine_description(torch.device("cpu")) + f", OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "data": args.data, "rows": []}
    for backbone in args.backbones.split(","):
        for shape in args.shapes.split(","):
            rounds = [alternating_round(i, (fsltool_steps, args.data, backbone, shape, args.steps), (plain_steps, args.data, backbone, shape, args.steps))
                      for i in range(args.rounds)]
            row = {"backbone": backbone, "shape": shape,
                   "fsltool_step_s": [round(a["step_s"], 3) for a, _ in rounds],
                   "plain_step_s": [round(b["step_s"], 3) for _, b in rounds],
                   "fsltool_over_plain": round(statistics.median(a["step_s"] / b["step_s"] for a, b in rounds), 3),
                   "fsltool_peak_mib": round(max(a["peak_mib"] for a, _ in rounds)),
                   "plain_peak_mib": round(max(b["peak_mib"] for _, b in rounds)),
                   **({} if args.no_evaluation else
                      {k: round(v, 2) for k, v in in_child(evaluation, args.data, backbone, shape).items() if k == "evaluate_600_s"})}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.fomaml_steps:
        fomaml = in_child(fomaml_resnet12, args.data, args.fomaml_steps)
        report["fomaml_resnet12_5w1s"] = {k: round(v, 2) for k, v in fomaml.items()}
        print(json.dumps(report["fomaml_resnet12_5w1s"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
