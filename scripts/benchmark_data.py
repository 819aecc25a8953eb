"""What background episode assembly (recipe key train.prefetch) buys: the time a meta-training step waits for its
episodes, with and without prefetching, and each run's peak resident memory.

Each (data file, prefetch) pair is one child process running ProtoNet / Conv-4 meta-training for a number of steps;
the loop itself records the wait (metrics.jsonl ``data_wait_s``, per step). Data files: data/omniglot.h5 (images in
memory: the wait is a gather and a float conversion) or, without it, a generated synthetic file; and the
miniImageNet- and tieredImageNet-sized data/scale-{mini,tiered}.h5 of benchmark_scale.py when they exist (read from
HDF5 per episode).

    nice -n 5 .venv/bin/python scripts/benchmark_data.py [--steps 30] [--json results/benchmark_data.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmark_scale import peak_rss_mb

SHAPES = {"omniglot": "60w5s5q", "synthetic": "60w5s5q", "scale-mini": "5w5s15q", "scale-tiered": "5w5s15q"}  # each data file's training shape


def measure(data: Path, shape: str, steps: int, prefetch: bool) -> dict[str, Any]:
    from fsltool.data.store import FewShotData
    from fsltool.recipe import Recipe, TrainConfig, ValidationConfig
    from fsltool.train import meta_train

    with FewShotData(data) as opened:
        in_memory = opened.in_memory
        validation = str(opened.stored_shapes("val")[0])
    with tempfile.TemporaryDirectory() as output:
        recipe = Recipe(data=str(data), output=output, validation=ValidationConfig(shape=validation, every=10**6, episodes=1),
                        train=TrainConfig(shape=shape, episodes=steps, log_every=steps, lr_step=0, prefetch=prefetch))
        meta_train(recipe, quiet=True)
        row = json.loads((Path(output) / "metrics.jsonl").read_text().splitlines()[0])
    return {"data": str(data), "in_memory": in_memory, "shape": shape, "prefetch": prefetch, "steps": steps,
            "data_wait_ms_per_step": 1000 * row["data_wait_s"], "step_ms": 1000 / row["episodes_per_s"],
            "peak_rss_mb": peak_rss_mb()}


def data_files(scratch: Path) -> list[Path]:
    files = [Path("data/omniglot.h5")]
    if not files[0].is_file():
        from fsltool.data.episodes import EpisodeShape
        from fsltool.data.pack import EpisodePlan, pack
        from fsltool.data.sources.synthetic import synthetic

        files = [scratch / "synthetic.h5"]
        pack(synthetic(classes=400), files[0], EpisodePlan(shapes=(EpisodeShape(5, 1, 15),), episodes=20), quiet=True)
    return files + [path for path in (Path("data/scale-mini.h5"), Path("data/scale-tiered.h5")) if path.is_file()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=3, metavar=("DATA", "SHAPE", "PREFETCH"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        data, shape, prefetch = args.child
        print(json.dumps(measure(Path(data), shape, args.steps, prefetch == "on")))
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for data in data_files(Path(scratch)):
            for prefetch in ("off", "on"):
                command = [sys.executable, __file__, "--steps", str(args.steps), "--child", str(data), SHAPES[data.stem], prefetch]
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode:
                    raise SystemExit(result.stderr)
                rows.append(json.loads(result.stdout.splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
