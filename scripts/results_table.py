"""Print the README's results table (markdown) from `fsltool evaluate --json` files in a folder.

    python scripts/results_table.py results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PAPER = {  # Snell et al. 2017, Omniglot, non-transductive
    "protonet": {"5w1s": 98.8, "5w5s": 99.7, "20w1s": 96.0, "20w5s": 98.9},
}


def main(folder: str) -> None:
    root = Path(folder)
    seconds = {}
    timing = root / "omniglot-train-seconds.txt"
    if timing.exists():
        seconds = {line.split()[0]: int(line.split()[1]) for line in timing.read_text().splitlines() if line.strip()}
    print("| method | setting | paper | measured (600 stored test episodes, 95% CI) | trained by recipe | training episodes | training time |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(root.glob("omniglot-*-*.json")):
        method, setting = path.stem.split("-")[1:3]
        result = json.loads(path.read_text())
        recipe_run = Path(result["run"]).name
        train_setting = recipe_run.split("-")[-1]
        metrics = Path(result["run"]) / "metrics.jsonl"
        episodes = max(json.loads(line)["episode"] for line in metrics.read_text().splitlines()) if metrics.exists() else "?"
        minutes = f"{seconds[train_setting] / 60:.0f} min" if train_setting in seconds else "?"
        paper = PAPER.get(method, {}).get(setting, "")
        print(f"| {method} | {setting} | {paper} | {result['accuracy']:.2f} ± {result['ci95']:.2f} | {recipe_run} | {episodes} | {minutes} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results")
