"""Seconds per training step with Conv-4 blocks as fsltool builds them (conv -> BN -> maxpool -> ReLU) against the
papers' order (conv -> BN -> ReLU -> maxpool), on the shipped recipes' training steps (meta_step + backward, timed;
then an Adam step; random 28x28 images). The two orders compute the same function; pooling first runs the ReLU on
a quarter of the map.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_block_order.py [--repeats 5] [--only snail] [--json FILE]

Both models start from the same weights and see the same episodes, their steps alternating (a machine whose load
changes slows both alike); medians of ``--repeats`` steps after one warm-up step. Also reports whether the first
step's gradients are equal bit for bit (first-order methods) or how far apart they are (MAML's second order).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmark_maml import episodes  # scripts/benchmark_maml.py: the same random 28x28 episodes

from fsltool.builtin_recipes import find_recipe
from fsltool.checkpoint import build_model, model_config
from fsltool.data.episodes import Episode, EpisodeShape
from fsltool.device import machine_description
from fsltool.methods.base import Method
from fsltool.platform_tuning import tune_allocator
from fsltool.recipe import Recipe, load_recipe

RECIPES = ("omniglot/protonet-5w1s", "omniglot/relationnet-5w1s", "omniglot/reptile-20w1s", "omniglot/maml++-5w1s",
           "omniglot/snail-pretrained-20w5s")


def use_papers_order(model: nn.Module) -> nn.Module:
    """Reorders, in place, every [conv, BN, maxpool, ReLU] block of ``model`` to conv -> BN -> ReLU -> maxpool, as
    the papers write them (the same module objects, so state that refers to them stays valid)."""
    for block in model.modules():
        if isinstance(block, nn.Sequential) and [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU]:
            block[2], block[3] = block[3], block[2]
    return model


def recipe_model(recipe: Recipe) -> Method:
    torch.manual_seed(0)
    return build_model(model_config(recipe, (1, 28, 28), [0.1], [0.3], provenance={}))


def meta_batch(recipe: Recipe, generator: torch.Generator) -> list[Episode]:
    return episodes(EpisodeShape.parse(recipe.train.shape), recipe.train.meta_batch, generator)


def train_step(method: Method, batch: list[Episode]) -> float:
    """meta_step and backward; returns their seconds. The gradients stay in .grad for the comparison."""
    start = time.perf_counter()
    outputs = method.meta_step(batch)
    method.zero_grad(set_to_none=True)
    torch.stack([output.loss for output in outputs]).mean().backward()
    return time.perf_counter() - start


def largest_relative_difference(a: Method, b: Method) -> float:
    return max(float((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30))
               for p, q in zip(a.parameters(), b.parameters(), strict=True) if p.grad is not None)


def compare(recipe_name: str, repeats: int) -> dict[str, object]:
    recipe = load_recipe(find_recipe(recipe_name).path, [])
    ours = recipe_model(recipe).train()
    theirs = use_papers_order(copy.deepcopy(ours))
    runs = [(model, torch.optim.Adam(model.parameters(), lr=1e-4), torch.Generator().manual_seed(0), []) for model in (ours, theirs)]
    difference = None
    for repeat in range(repeats + 1):
        for model, _, generator, times in runs:
            torch.manual_seed(repeat)  # methods that draw per task (Reptile's minibatches, SNAIL's orders) draw alike
            seconds = train_step(model, meta_batch(recipe, generator))
            if repeat:  # the first is a warm-up
                times.append(seconds)
        if not repeat:
            difference = largest_relative_difference(ours, theirs)
        for model, optimizer, _, _ in runs:
            optimizer.step()
    ours_s, theirs_s = statistics.median(runs[0][3]), statistics.median(runs[1][3])
    return {"recipe": recipe_name, "shape": recipe.train.shape, "meta_batch": recipe.train.meta_batch,
            "papers_order_s": round(theirs_s, 4), "pool_first_s": round(ours_s, 4), "speedup": round(theirs_s / ours_s, 3),
            "first_step_gradients_max_relative_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="run the recipes whose name contains this text")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tune_allocator()
    rows = []
    for name in RECIPES:
        if args.only in name:
            rows.append(compare(name, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    report = {"machine": machine_description(torch.device("cpu")), "repeats": args.repeats, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
