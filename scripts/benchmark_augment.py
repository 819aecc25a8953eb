"""What train.augment adds to a training step: augmentation time of one episode against a ProtoNet step on it
(Conv-4 and ResNet-12), same process, medians of --rounds.

    python scripts/benchmark_augment.py [--rounds 20] [--json results/benchmark_augment.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fsltool.data.augment import AugmentConfig, augment_images, episode_generator
from fsltool.methods import build_method
from fsltool.models import build_backbone

CASES = [  # (name, kind, channels, size, way, shot, query, backbone)
    ("glyphs 60w5s5q 28px, conv4", "glyph", 1, 28, 60, 5, 5, "conv4"),
    ("photos 5w1s15q 84px, conv4", "natural", 3, 84, 5, 1, 15, "conv4"),
    ("photos 5w1s15q 84px, resnet12", "natural", 3, 84, 5, 1, 15, "resnet12"),
]


def median_seconds(work: Callable[[], object], rounds: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def protonet_step(backbone: str, channels: int, size: int, way: int, shot: int, query: int) -> Callable[[], object]:
    method = build_method("protonet", build_backbone(backbone, channels, [0.5] * channels, [0.25] * channels, image_size=size), {})
    optimizer = torch.optim.Adam(method.parameters())
    support, queries = torch.rand(way * shot, channels, size, size), torch.rand(way * query, channels, size, size)
    labels, query_labels = torch.arange(way).repeat_interleave(shot), torch.arange(way).repeat_interleave(query)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(method(support, labels, queries), query_labels).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    for name, kind, channels, size, way, shot, query, backbone in CASES:
        images = torch.rand(way * (shot + query), channels, size, size)
        config = AugmentConfig(kind=kind)
        augment_s = median_seconds(lambda: augment_images(images, config, episode_generator(0, 1, 0)), args.rounds)
        step_s = median_seconds(protonet_step(backbone, channels, size, way, shot, query), max(3, args.rounds // 4))
        results.append({"case": name, "augment_s": augment_s, "step_s": step_s, "ratio": augment_s / step_s})
        print(f"{name}: augment {augment_s * 1000:.1f} ms, step {step_s * 1000:.0f} ms ({100 * augment_s / step_s:.1f}% of a step)")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"threads": torch.get_num_threads(), "results": results}, file, indent=1)


if __name__ == "__main__":
    main()
