"""Reptile's evaluation with per-query BatchNorm (the paper's non-transductive protocol), and where its time goes:
the test-time fine-tuning (``train_copies``: test_inner_steps minibatches per episode) against the query scoring
(``per_query_logits``: each query normalised with the statistics of the support set plus itself, so S+1 images
per query).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_reptile_evaluation.py --recipe omniglot/reptile-5w1s --episodes 48
    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_reptile_evaluation.py --recipe omniglot/reptile-20w5s --episodes 2
    .venv/bin/python scripts/benchmark_reptile_evaluation.py --run runs/omniglot/reptile-5w1s --episodes 600

The network comes from ``--run`` (its best checkpoint) or, with ``--recipe``, is the recipe's method as
initialised: the weights do not change the speed. Wall-clock and CPU seconds of ``evaluate`` on the first
``--episodes`` stored test episodes of the recipe's test shape, extrapolated to 600; on a machine shared with other
jobs the CPU seconds of a one-thread run are the steadier figure.

It also counts the evaluation's convolution work (multiply-accumulates of the fine-tuning's forward and backward
passes and of the per-query passes, from the backbone's layer shapes) and measures the best rate this machine
reaches on that backbone: forward and backward over one large dense batch, the most favourable layout for
PyTorch's CPU convolutions. Work divided by that rate is a floor on the evaluation's time on this machine at this
precision, whatever the batching (``floor_s_per_600_episodes``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from fsltool.atomic import write_json
from fsltool.builtin_recipes import find_recipe
from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.device import machine_description
from fsltool.evaluate import evaluate
from fsltool.methods import build_method
from fsltool.methods.reptile import Reptile
from fsltool.models import build_backbone
from fsltool.models.backbones import Backbone
from fsltool.platform_tuning import tune_allocator
from fsltool.recipe import Recipe, load_recipe


@contextmanager
def timed(owner: Any, name: str, seconds: list[float]) -> Iterator[None]:
    """Add the wall-clock seconds of every call of ``owner.name`` to ``seconds[0]`` while active."""
    original: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def reptile_of(args: argparse.Namespace, data: FewShotData) -> tuple[Reptile, Recipe]:
    if args.run:
        trained = load_trained(args.run)
        method, recipe = trained.method, trained.recipe
    else:
        recipe = load_recipe(find_recipe(args.recipe).path)
        torch.manual_seed(0)
        backbone = build_backbone(recipe.backbone, data.image_shape[0], data.mean, data.std, **recipe.backbone_options)
        method = build_method(recipe.method, backbone, recipe.method_options)
    assert isinstance(method, Reptile), f"not a Reptile model: {recipe.method}"
    return method, recipe


def convolution_macs(backbone: Backbone, image_shape: tuple[int, ...]) -> list[int]:
    """Multiply-accumulates of each convolution of the backbone's feature layers for one image, in order."""
    macs: list[int] = []

    def count(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        assert isinstance(module, torch.nn.Conv2d)
        kernel = module.weight[0].numel()  # in_channels / groups x kh x kw
        macs.append(output[0].numel() * kernel)

    hooks = [m.register_forward_hook(count) for m in backbone.features.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            backbone.features(torch.zeros(1, *image_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return macs


def evaluation_macs(method: Reptile, shape: EpisodeShape, image_shape: tuple[int, ...]) -> int:
    """Convolution MACs of one episode's evaluation: the fine-tuning (forward, weight gradients, input gradients
    except the first layer's) and, with per-query BatchNorm, S+1 images per query (else S+Q images once)."""
    layers = convolution_macs(method.backbone, image_shape)
    forward = sum(layers)
    train_image = forward + forward + (forward - layers[0])
    support, queries = shape.way * shape.shot, shape.way * shape.query
    scored = queries * (support + 1) if method.per_query_bn else support + queries
    return method.test_inner_steps * method.test_inner_batch * train_image + scored * forward


def dense_rate(backbone: Backbone, image_shape: tuple[int, ...], batch: int = 2048, repeats: int = 5) -> float:
    """MACs per second of forward + backward (weight and input gradients but the first layer's input) over one
    dense batch of ``batch`` images, the best of ``repeats``: the most this machine does with these layers."""
    features = backbone.features.train()
    images = torch.rand(batch, *image_shape)
    layers = convolution_macs(backbone, image_shape)
    work = batch * (3 * sum(layers) - layers[0])
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        features(images).sum().backward()
        best = min(best, time.perf_counter() - start)
    features.zero_grad(set_to_none=True)
    return work / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run")
    source.add_argument("--recipe")
    parser.add_argument("--data", default="data/omniglot.h5")
    parser.add_argument("--episodes", type=int, default=48)
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--no-tuning", action="store_true", help="leave glibc's allocator at its defaults (the CLI's --no-tuning)")
    args = parser.parse_args()
    if not args.no_tuning:
        tune_allocator()  # as the CLI does: `fsltool evaluate` runs under it

    with FewShotData(args.data) as data:
        method, recipe = reptile_of(args, data)
        shape = EpisodeShape.parse(recipe.test_shape)
        fine_tuning, scoring = [0.0], [0.0]
        with timed(method, "train_copies", fine_tuning), timed(method.network, "per_query_logits", scoring):
            wall, cpu = time.perf_counter(), time.process_time()
            result = evaluate(method, data, "test", shape, episodes=args.episodes)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        image_shape = tuple(data.image_shape)
        macs = evaluation_macs(method, shape, image_shape)
        rate = dense_rate(method.backbone, image_shape)
    scale = 600 / len(result.accuracies)
    figures = {
        "model": args.run or f"{args.recipe} (as initialised)",
        "shape": str(shape),
        "per_query_bn": method.per_query_bn,
        "episodes": len(result.accuracies),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "fine_tuning_wall_s": round(fine_tuning[0], 2),
        "query_scoring_wall_s": round(scoring[0], 2),
        "wall_s_per_600_episodes": round(wall * scale, 1),
        "cpu_s_per_600_episodes": round(cpu * scale, 1),
        "convolution_gmac_per_600_episodes": round(600 * macs / 1e9, 1),
        "achieved_gmac_per_s": round(len(result.accuracies) * macs / wall / 1e9, 1),
        "dense_batch_gmac_per_s": round(rate / 1e9, 1),
        "floor_s_per_600_episodes": round(600 * macs / rate, 1),
        "allocator": "glibc defaults" if args.no_tuning else "tuned as the CLI",
        "machine": machine_description(torch.device("cpu")) + f", load average {os.getloadavg()[0]:.1f} at the end",
    }
    write_json("-", figures)
    if args.json_out:
        write_json(args.json_out, figures)


if __name__ == "__main__":
    main()
