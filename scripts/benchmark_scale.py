"""Memory and time at benchmark scale: miniImageNet's 60,000 RGB 84x84 images in 100 classes (1.27 GB of raw
pixels) or, with ``--scale tiered``, tieredImageNet's 779,165 in 608 classes (351/97/160; 16.5 GB of raw pixels),
streamed from a synthetic source into `pack` (no image folder on disk), then a few meta-training steps on the packed
file.

Each phase runs in a child process of its own, so its peak resident memory (getrusage ru_maxrss) is its alone:
- baseline: torch and fsltool imported, a Conv-4 ProtoNet built (the floor of any fsltool process);
- prepare: packing the 60,000 images (chunked, gzip) with stored evaluation episodes;
- stream: the training loop's episode supply alone (MetaBatches, prefetching) for a number of 5w5s15q meta-batches:
  the memory the data costs, read lazily per episode from the packed file;
- train: meta-training ProtoNet for a few steps and one validation on the packed file. Its peak is dominated by
  Conv-4's activations on one 84x84 episode (kept for backward), which depend on the episode shape, not on the
  size of the data set;
- control: the same training on a 100-class file of 30 images per class (3,000 images, in memory): about the same
  peak as "train" shows that the peak is the model's and not the data set's.

    nice -n 5 .venv/bin/python scripts/benchmark_scale.py [--scale mini|tiered] [--json results/benchmark_scale.json]

The packed file is kept (benchmark_data.py measures the data wait on it); pass --remove to delete it afterwards.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 84


@dataclass(frozen=True)
class Scale:
    """A benchmark's class counts per split and images per class (tieredImageNet's 779,165 images over 608
    classes average 1,281.5 per class; 1,282 per class here gives 779,456)."""

    train: int
    val: int
    test: int
    per_class: int

    @property
    def classes(self) -> int:
        return self.train + self.val + self.test

    @property
    def raw_bytes(self) -> int:
        return self.classes * self.per_class * 3 * SIZE * SIZE


SCALES = {"mini": Scale(64, 16, 20, 600), "tiered": Scale(351, 97, 160, 1282)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synthetic_image(item: tuple[int, int]) -> np.ndarray:
    """A random RGB image per (class, index): 6x6 random colours upsampled 14x plus pixel noise of amplitude 32, so
    gzip compresses it about as little as it does photographs (a smooth image alone would shrink 50x)."""
    rng = np.random.default_rng(list(item))
    low = rng.integers(0, 224, (3, 6, 6), dtype=np.uint8).repeat(SIZE // 6, axis=1).repeat(SIZE // 6, axis=2)
    return low + rng.integers(0, 32, (3, SIZE, SIZE), dtype=np.uint8)


def baseline() -> dict[str, Any]:
    from fsltool.methods.protonet import ProtoNet
    from fsltool.models.backbones import conv4

    ProtoNet(conv4(3, [0.5] * 3, [0.25] * 3))
    return {"peak_rss_mb": peak_rss_mb()}


def prepare(out: Path, scale: Scale) -> dict[str, Any]:
    from fsltool.data.episodes import EpisodeShape
    from fsltool.data.pack import EpisodePlan, pack
    from fsltool.data.sources.base import ClassSpec, SourceListing

    splits = ["train"] * scale.train + ["val"] * scale.val + ["test"] * scale.test
    classes = [ClassSpec(f"class{c:03d}", splits[c], tuple((c, i) for i in range(scale.per_class))) for c in range(scale.classes)]
    listing = SourceListing(classes, (3, SIZE, SIZE), synthetic_image, str, {"source": "benchmark_scale synthetic"})
    plan = EpisodePlan(shapes=(EpisodeShape(5, 1, 15), EpisodeShape(5, 5, 15)), episodes=min(100, scale.per_class))
    began = time.perf_counter()
    pack(listing, out, plan, overwrite=True, quiet=True)
    return {"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - began, "file_mb": out.stat().st_size / 2**20}


def stream(data: Path, steps: int) -> dict[str, Any]:
    import torch

    from fsltool.data.batches import MetaBatches
    from fsltool.data.episodes import EpisodeShape
    from fsltool.data.store import FewShotData

    with FewShotData(data) as opened:
        sampler = opened.sampler("train", EpisodeShape.parse("5w5s15q"), torch.Generator().manual_seed(0))
        batches = MetaBatches(opened, sampler, 4, range(4), steps, prefetch=True)
        began = time.perf_counter()
        for _ in range(steps):
            batches.next()
        batches.close()
        return {"peak_rss_mb": peak_rss_mb(), "meta_batches": steps, "episodes_per_meta_batch": 4,
                "ms_per_episode": 1000 * (time.perf_counter() - began) / (4 * steps), "lazy_reads": not opened.in_memory}


def train(data: Path, steps: int) -> dict[str, Any]:
    from fsltool.recipe import Recipe, TrainConfig, ValidationConfig
    from fsltool.train import meta_train

    with tempfile.TemporaryDirectory() as output:
        recipe = Recipe(data=str(data), output=output, train=TrainConfig(shape="5w5s15q", episodes=steps, log_every=steps, lr_step=0),
                        validation=ValidationConfig(shape="5w1s15q", every=steps, episodes=20), test_shape="5w1s15q")
        began = time.perf_counter()
        meta_train(recipe, quiet=True)
        seconds = time.perf_counter() - began
        row = next(json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines() if '"train"' in line)
    return {"peak_rss_mb": peak_rss_mb(), "seconds": seconds, "steps": steps,
            "data_wait_s_per_step": row["data_wait_s"], "episodes_per_s": row["episodes_per_s"]}


def control(steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        small = Path(scratch) / "small.h5"
        prepare(small, Scale(64, 16, 20, 30))
        return train(small, steps)


def child(phase: str, *args: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, __file__, "--phase", phase, *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"phase {phase} failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="mini")
    parser.add_argument("--out", type=Path, default=None, help="packed file (default: data/scale-SCALE.h5)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--remove", action="store_true", help="delete the packed file afterwards")
    parser.add_argument("--phase", choices=["baseline", "prepare", "stream", "train", "control"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    scale = SCALES[args.scale]
    args.out = args.out or Path(f"data/scale-{args.scale}.h5")
    if args.phase:
        phases = {"baseline": baseline, "prepare": lambda: prepare(args.out, scale), "stream": lambda: stream(args.out, 5 * args.steps),
                  "train": lambda: train(args.out, args.steps), "control": lambda: control(args.steps)}
        print(json.dumps(phases[args.phase]()))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    where = ["--scale", args.scale, "--out", str(args.out), "--steps", str(args.steps)]
    report = {"scale": args.scale, "images": scale.classes * scale.per_class, "raw_mb": scale.raw_bytes / 2**20,
              "baseline": child("baseline"), "prepare": child("prepare", *where), "stream": child("stream", *where),
              "train": child("train", *where), "control": child("control", *where)}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.remove:
        args.out.unlink()


if __name__ == "__main__":
    main()
