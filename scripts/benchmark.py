"""Speed of the hot paths, measured in one process (medians of repeated runs):

- a meta-training step (sample + assemble + forward + backward + Adam) of Prototypical Networks with
  Conv-4 at 60w5s5q and 5w1s15q, on the packed data file;
- evaluation of the 600 stored 5w1s15q test episodes (embedding each image once);
- what channels_last (training step) and the frozen inference copy (evaluation) buy, measured beside;
  `--no-tuning` shows what the allocator setting buys.

    .venv/bin/python scripts/benchmark.py --data data/omniglot.h5 [--json results/benchmark.json]

Run it on an otherwise idle machine: the figures are per process, with torch's default threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.device import machine_description
from fsltool.evaluate import embed_all, evaluate
from fsltool.methods.protonet import ProtoNet
from fsltool.models.backbones import conv4
from fsltool.platform_tuning import tune_allocator


def median_seconds(action: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(data: FewShotData, shape: EpisodeShape, channels_last: bool) -> Callable[[], None]:
    """A ProtoNet Conv-4 training step on ``shape`` episodes, to call repeatedly: sample, forward, backward, Adam."""
    torch.manual_seed(0)
    method = ProtoNet(conv4(data.image_shape[0], data.mean, data.std, channels_last=channels_last))
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    sampler = data.sampler("train", shape, torch.Generator().manual_seed(0))

    def step() -> None:
        episode = data.episode(*sampler.sample(), shape)
        output = method.step(episode)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()

    return step


def train_step_seconds(data: FewShotData, shape: EpisodeShape, repeats: int, channels_last: bool) -> float:
    return median_seconds(train_step(data, shape, channels_last), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/omniglot.h5")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-tuning", action="store_true", help="measure without the allocator setting")
    args = parser.parse_args()
    if not args.no_tuning:
        tune_allocator()
    figures: dict[str, object] = {
        "machine": machine_description(torch.device("cpu")),
        "allocator_tuned": not args.no_tuning,
        "data": args.data,
    }
    with FewShotData(args.data) as data:
        for text in ("60w5s5q", "5w1s15q"):
            shape = EpisodeShape.parse(text)
            seconds = train_step_seconds(data, shape, args.repeats, channels_last=True)
            figures[f"train_step_s_{text}"] = round(seconds, 4)
            figures[f"train_episodes_per_s_{text}"] = round(1 / seconds, 2)
        figures["train_step_s_60w5s5q_contiguous"] = round(train_step_seconds(data, EpisodeShape.parse("60w5s5q"), args.repeats, channels_last=False), 4)
        torch.manual_seed(0)
        method = ProtoNet(conv4(data.image_shape[0], data.mean, data.std)).eval()
        shape = EpisodeShape(5, 1, 15)
        figures["evaluate_600_stored_5w1s15q_s"] = round(median_seconds(lambda: evaluate(method, data, "test", shape), 3, warmup=1), 3)
        support, query = data.stored_episodes("test", shape)
        distinct = np.unique(np.concatenate([support.ravel(), query.ravel()]))
        figures["evaluate_distinct_images"] = len(distinct)
        figures["embed_distinct_images_eager_s"] = round(median_seconds(lambda: embed_all(method, data, distinct, frozen=False), 3, warmup=1), 3)
        figures["embed_distinct_images_frozen_s"] = round(median_seconds(lambda: embed_all(method, data, distinct), 3, warmup=1), 3)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
