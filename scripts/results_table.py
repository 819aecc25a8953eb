"""Print the README's results table (markdown) from `fsltool evaluate --json` files in a folder.

    python scripts/results_table.py results            # the table
    python scripts/results_table.py results --curves   # each row's validation curve (accuracy vs episodes, minutes)

Each results/omniglot-<method>-<setting>[-<variant>].json is one row; its run folder's metrics.jsonl and
recipe.yaml give the training budget (episodes and the splits trained on) and time, and results/omniglot-<run>-export.json (`fsltool export --json`),
where there is one, the exported body's prototype accuracy on the same stored episodes (MAML, Reptile). A
transductive, ensemble (`--ensemble N`) or augmented-support (`--support-copies N`) result is marked as such. Files of other protocols (e.g. MANN's --by-instance tables) are left out.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

PAPER = {  # published Omniglot accuracies (docs/protocols.md#reported-accuracies-)
    "protonet": {"5w1s": 98.8, "5w5s": 99.7, "20w1s": 96.0, "20w5s": 98.9},  # Snell et al. 2017, non-transductive
    "relationnet": {"5w1s": 99.6, "5w5s": 99.8, "20w1s": 97.6, "20w5s": 99.1},  # Sung et al. 2018
    "matchingnet": {"5w1s": 98.1, "5w5s": 98.9, "20w1s": 93.8, "20w5s": 98.5},  # Vinyals et al. 2016, no FCE
    "snail": {"5w1s": 99.07, "5w5s": 99.78, "20w1s": 97.64, "20w5s": 99.36},  # Mishra et al. 2018
    "maml": {"5w1s": 98.7, "5w5s": 99.9, "20w1s": 95.8, "20w5s": 98.9},  # Finn et al. 2017, transductive BatchNorm
    "fomaml": {"5w1s": 98.3, "5w5s": 99.2, "20w1s": 89.4, "20w5s": 97.9},  # Finn et al. 2017, transductive BatchNorm
    "reptile": {"5w1s": 95.39, "5w5s": 98.90, "20w1s": 88.14, "20w5s": 96.65},  # Nichol et al. 2018, non-transductive
    "maml++": {"5w1s": 99.47, "5w5s": 99.93, "20w1s": 97.65, "20w5s": 99.33},  # Antoniou et al. 2019, transductive ensemble
}
NAME = re.compile(r"omniglot-(?P<method>[a-z+]+)-(?P<setting>\d+w\d+s)(?:-[\w-]+)?$")
ORDER = {"5w1s": 0, "5w5s": 1, "20w1s": 2, "20w5s": 3}
RUN_CHECKPOINT = re.compile(r"(last|best|episode-\d+)\.pt")  # names fsltool gives a run's checkpoints


def run_of(path: Path) -> Path:
    """The run folder a path names: itself, or the run a checkpoint fsltool wrote belongs to
    (``RUN/checkpoints/NAME.pt``, or a copy's folder)."""
    if not RUN_CHECKPOINT.fullmatch(path.name):
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def init_label(init: str) -> str:
    """The run or file a recipe's `init` names; a run's own checkpoint says which run (`last.pt` alone does not)."""
    path = Path(init)
    if not RUN_CHECKPOINT.fullmatch(path.name):
        return path.name
    return f"{run_of(path).name}/{path.name}"


def rows(root: Path) -> list[tuple[str, str, str, str]]:
    """(method, setting, table line, validation-curve line) per result file, in table order."""
    found, missing = [], []
    for path in sorted(root.glob("omniglot-*.json")):
        match = NAME.match(path.stem)
        result = json.loads(path.read_text())
        if not match or "accuracy" not in result:
            continue
        method, setting = match["method"], match["setting"]
        run = root / "runs" / run_of(Path(result["run"])).name  # the committed evidence, never a local run folder
        if not (run / "metrics.jsonl").is_file():
            missing.append(path.name)
            continue
        log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        tested_at = result.get("training", {}).get("episodes")
        checkpoint = result.get("checkpoint")  # an ensemble's: a list of them, each from the whole run
        tested = Path(checkpoint).name if isinstance(checkpoint, str) else ""
        if tested_at is not None and RUN_CHECKPOINT.fullmatch(tested) and tested != "best.pt":  # the run may have gone on after it
            log = [row for row in log if row.get("episode", 0) <= tested_at]
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        steps, batch = log[-1]["episode"], recipe["train"].get("meta_batch", 1)
        budget = f"{steps} × {batch} of {recipe['train']['shape']}" if batch > 1 else f"{steps} of {recipe['train']['shape']}"
        budget += " on " + "+".join(recipe["train"].get("splits", ["train"]))  # runs from before train.splits: train alone
        if result.get("class_split", "vinyals") != "vinyals":  # other test classes: set beside the paper's kind of split
            budget += f"; {result['class_split']} class split" + (f" (seed {result['class_split_seed']})" if "class_split_seed" in result else "")
            if "class_split_counts" in result:  # the reference code's own counts (MAML++: 1150/50/423 characters)
                budget += f" of {'/'.join(map(str, result['class_split_counts']))} characters"
        if result.get("image_resample", "lanczos") != "lanczos":  # the reference code's binary glyphs, not fsltool's default
            budget += f"; {result['image_resample']} resampling"
        if "adapt_steps" in result:  # evaluated with another number of fine-tuning steps than the recipe's
            budget += f"; {result['adapt_steps']} fine-tuning steps at test"
        if "rotated_splits" in result:  # e.g. Reptile's upright test characters
            budget += f"; rotated classes in {'+'.join(result['rotated_splits'])} only" if result["rotated_splits"] else "; no rotated classes"
        if recipe["train"].get("augment", {}).get("kind", "none") != "none":  # e.g. MAML++'s quarter turns of each class
            budget += f"; {recipe['train']['augment']['kind']} augmentation"
        if recipe.get("init"):
            taken = " (every layer)" if recipe.get("init_scope") == "model" else ""  # a trained model trained on
            budget += f", from {init_label(recipe['init'])}{taken}"  # meta-fine-tuned: the pretraining's budget is its own run's
        paper = PAPER.get(method, {}).get(setting, "")
        labels = [*(["transductive"] if result.get("transductive") else []),
                  *([f"ensemble of {result['ensemble']}"] if result.get("ensemble", 1) > 1 else []),
                  *([f"{result['support_copies']} augmented support copies"] if result.get("support_copies") else [])]
        measured = f"{result['accuracy']:.2f} ± {result['ci95']:.2f}" + (f" ({', '.join(labels)})" if labels else "")
        if (result["query"], result["episodes"], result["episodes_from"]) != (15, 600, "stored"):  # not the header's protocol
            measured += f" ({result['way']}w{result['shot']}s{result['query']}q, {result['episodes']:,} {result['episodes_from']} episodes)"
        export = root / f"omniglot-{run.name}-export.json"
        body = json.loads(export.read_text())["verification"] if export.exists() else None
        body_accuracy = f"{body['accuracy']:.2f}" if body and body.get("shape", "").startswith(setting) else ""
        validations = [row for row in log if row["phase"] == "val"]
        curve = ", ".join(f"{row['episode']} ({row['elapsed'] / 60:.1f} min): {row['accuracy']:.2f}" for row in validations)
        curve_shape = validations[0]["shape"] if validations else "no"
        found.append((method, setting, f"| {method} | {setting} | {paper} | {measured} | {body_accuracy} | "
                                         f"{run.name} | {budget} | {log[-1]['elapsed'] / 60:.0f} min |",
                      f"- {run.name} ({curve_shape} validation, episode (minutes): accuracy): {curve}"))
    if missing:
        print(f"left out (no committed {root}/runs/<run>/metrics.jsonl behind them): {', '.join(missing)}", file=sys.stderr)
    return sorted(found, key=lambda row: (row[0], ORDER.get(row[1], 9), row[2]))


def main(folder: str, curves: bool) -> None:
    if curves:
        for *_, curve in rows(Path(folder)):
            print(curve)
        return
    print("| method | setting | paper | measured (600 stored test episodes, 95% CI) | exported body, prototypes | run | "
          "training episodes | training time (incl. validation) |")
    print("|---|---|---|---|---|---|---|---|")
    for _, _, line, _ in rows(Path(folder)):
        print(line)


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--curves"]
    main(arguments[0] if arguments else "results", "--curves" in sys.argv[1:])
