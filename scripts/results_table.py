"""Print the README's results table (markdown) from `fsltool evaluate --json` files in a folder.

    python scripts/results_table.py results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PAPER = {  # published Omniglot accuracies (../shared/docs/PROTOCOLS.md)
    "protonet": {"5w1s": 98.8, "5w5s": 99.7, "20w1s": 96.0, "20w5s": 98.9},  # Snell et al. 2017, non-transductive
    "relationnet": {"5w1s": 99.6, "5w5s": 99.8, "20w1s": 97.6, "20w5s": 99.1},  # Sung et al. 2018
    "matchingnet": {"5w1s": 98.1, "5w5s": 98.9, "20w1s": 93.8, "20w5s": 98.5},  # Vinyals et al. 2016, no FCE
}


def main(folder: str) -> None:
    root = Path(folder)
    print("| method | setting | paper | measured (600 stored test episodes, 95% CI) | trained by recipe | training episodes | training time (incl. validation) |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(root.glob("omniglot-*-*.json")):
        method, setting = path.stem.split("-")[1:3]
        result = json.loads(path.read_text())
        recipe_run = Path(result["run"]).name
        rows = [json.loads(line) for line in (Path(result["run"]) / "metrics.jsonl").read_text().splitlines()]
        episodes, minutes = rows[-1]["episode"], f"{rows[-1]['elapsed'] / 60:.0f} min"
        paper = PAPER.get(method, {}).get(setting, "")
        print(f"| {method} | {setting} | {paper} | {result['accuracy']:.2f} ± {result['ci95']:.2f} | {recipe_run} | {episodes} | {minutes} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results")
