"""Recipe ``precision``, fp32 against bf16, side by side: the median seconds of a ProtoNet meta-training step (forward
under fsltool.loop.autocast_for, backward, Adam) and of scoring an episode without gradients, on random episodes
(only the shapes matter for speed), for Conv-4 on grey 28 px and ResNet-12 on RGB 84 px images.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/benchmark_precision.py [--device cuda] [--repeats 10] [--json FILE]

On a CPU, bf16 pays only where it has bfloat16 instructions (avx512_bf16, AMX); on an NVIDIA GPU from Ampere on it
is expected to pay most for ResNet-12. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from fsltool.data.episodes import Episode, EpisodeShape, episode_labels
from fsltool.device import machine_description, resolve_device
from fsltool.loop import autocast_for
from fsltool.methods.protonet import ProtoNet
from fsltool.models import build_backbone

CASES = {  # backbone, channels, image size, episode shape
    "conv4 28px 20w5s15q": ("conv4", 1, 28, EpisodeShape(20, 5, 15)),
    "resnet12 84px 5w1s15q": ("resnet12", 3, 84, EpisodeShape(5, 1, 15)),
}


def median_seconds(action: Callable[[], object], repeats: int, device: torch.device, warmup: int = 2) -> float:
    def timed() -> float:
        start = time.perf_counter()
        action()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    for _ in range(warmup):
        timed()
    return statistics.median(timed() for _ in range(repeats))


def random_episode(channels: int, size: int, shape: EpisodeShape, device: torch.device) -> Episode:
    support_labels, query_labels = episode_labels(shape)
    generator = torch.Generator().manual_seed(0)
    return Episode(torch.rand(len(support_labels), channels, size, size, generator=generator), support_labels,
                   torch.rand(len(query_labels), channels, size, size, generator=generator), query_labels, shape).to(device)


def measure(case: str, precision: str, device: torch.device, repeats: int) -> dict[str, float]:
    name, channels, size, shape = CASES[case]
    torch.manual_seed(0)
    method = ProtoNet(build_backbone(name, channels, [0.5] * channels, [0.25] * channels, image_size=size)).to(device)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    episode = random_episode(channels, size, shape, device)

    def train_step() -> None:
        method.train()
        with autocast_for(precision, device, method):
            loss = method.step(episode).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def score() -> None:
        method.eval()
        with torch.no_grad(), autocast_for(precision, device):
            method(episode.support, episode.support_labels, episode.query)

    return {"train_step_s": median_seconds(train_step, repeats, device), "score_episode_s": median_seconds(score, repeats, device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device, "--device")
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": machine_description(device),
              "cases": {}}
    for case in CASES:
        fp32, bf16 = (measure(case, precision, device, args.repeats) for precision in ("fp32", "bf16"))
        report["cases"][case] = {"fp32": fp32, "bf16": bf16}
        print(f"{case}: train step fp32 {fp32['train_step_s'] * 1000:.1f} ms, bf16 {bf16['train_step_s'] * 1000:.1f} ms "
              f"({fp32['train_step_s'] / bf16['train_step_s']:.2f}x); score episode fp32 {fp32['score_episode_s'] * 1000:.1f} ms, "
              f"bf16 {bf16['score_episode_s'] * 1000:.1f} ms ({fp32['score_episode_s'] / bf16['score_episode_s']:.2f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
