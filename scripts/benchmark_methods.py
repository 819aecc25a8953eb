"""Training speed and evaluation time of every method, through the real training loop and evaluation:

- meta-training episodes per second at the paper's training episode shape (the built-in Omniglot recipe of the
  setting, e.g. omniglot/relationnet-5w1s: 5w1s19q), from the loop's own metrics.jsonl (validation excluded);
- seconds to evaluate the 600 stored test episodes of the setting (15 queries per class), as `fsltool evaluate`
  does it (embed-once for methods whose embedding ignores the episode, adaptation per episode for MAML/Reptile).

    .venv/bin/python scripts/benchmark_methods.py --data data/omniglot.h5 [--setting 5w1s] [--json results/benchmark_methods.json]

Weights do not change these speeds much, so each method trains only ``--episodes`` meta-steps. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fsltool.builtin_recipes import find_recipe
from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.device import machine_description
from fsltool.evaluate import evaluate
from fsltool.platform_tuning import tune_allocator
from fsltool.recipe import load_recipe
from fsltool.train import meta_train

METHODS = ("protonet", "relationnet", "matchingnet", "maml", "fomaml", "reptile", "snail", "mann")


def measure(method: str, setting: str, data: str, episodes: int, folder: Path) -> dict[str, object]:
    recipe = load_recipe(find_recipe(f"omniglot/{method}-{setting}").path, [
        f"data={data}", f"output={folder / method}", f"train.episodes={episodes}", f"train.log_every={episodes // 2}",
        f"validation.every={episodes}", "validation.episodes=5", "train.keep_checkpoints=0",
    ])
    meta_train(recipe, force=True, quiet=True)
    rows = [json.loads(line) for line in (folder / method / "metrics.jsonl").read_text().splitlines()]
    speed = [row for row in rows if row["phase"] == "train"][-1]["episodes_per_s"]  # the second window: warmed up
    trained = load_trained(folder / method, "last")
    shape = EpisodeShape.parse(setting)
    with FewShotData(data) as store:
        start = time.perf_counter()
        result = evaluate(trained.method, store, "test", shape)
        seconds = time.perf_counter() - start
    return {"method": method, "train_shape": recipe.train.shape, "meta_batch": recipe.train.meta_batch,
            "train_episodes_per_s": round(speed * recipe.train.meta_batch, 2), "meta_steps_per_s": round(speed, 3),
            "evaluate_600_s": round(seconds, 2), "evaluated_episodes": len(result.accuracies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/omniglot.h5")
    parser.add_argument("--setting", default="5w1s")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--episodes", type=int, default=20, help="meta-steps trained per method (the second half is timed)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tune_allocator()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods.split(","):
            row = measure(method, args.setting, args.data, args.episodes, Path(folder))
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"machine": machine_description(torch.device("cpu")), "data": args.data, "setting": args.setting, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
