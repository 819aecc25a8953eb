"""How well a run fits its own training episodes, window by window, beside its validation: a markdown table.

    python scripts/training_fit.py results/runs/snail-20w5s-pretrained-random-trainval-20k --every 2000

Each row averages the logged training rows (``phase: train``: the loss and accuracy of the meta-batches just
before each update, on freshly drawn episodes) whose episode falls in the window, and shows the learning rate at
its end and the validation scores inside it (a pretraining run's log counts steps, batches, instead of episodes).
Training accuracy well above validation on the same classes points at overfitting; both flat and equal point at
the fit itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import fmean


def read_log(run: Path) -> list[dict]:
    """The run folder's (or evidence folder's) metrics.jsonl rows, in order."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def position(row: dict) -> int:
    """Where a log row stands: meta-training counts episodes (meta-steps), pretraining steps."""
    return row["episode"] if "episode" in row else row["step"]


def windows(log: list[dict], every: int) -> list[dict]:
    """One summary per window of ``every`` episodes or steps ((start, end]) that holds training rows."""
    rows = []
    last = max(position(row) for row in log)
    for start in range(0, last, every):
        end = start + every
        train = [r for r in log if r["phase"] == "train" and start < position(r) <= end]
        if not train:
            continue
        validation = [f"{r['accuracy']:.2f} at {position(r):,}" for r in log
                      if r["phase"] == "val" and start < position(r) <= end]
        rows.append({"start": start, "end": min(end, last), "rows": len(train),
                     "accuracy": fmean(r["accuracy"] for r in train), "loss": fmean(r["loss"] for r in train),
                     "lr": train[-1]["lr"], "validation": validation})
    return rows


def table(summaries: list[dict]) -> str:
    lines = ["| episodes (pretraining: steps) | logged rows | training accuracy (mean) | training loss (mean) "
             "| learning rate at the end | validation |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['start']:,}-{s['end']:,} | {s['rows']} | {s['accuracy']:.2f} | {s['loss']:.4f} | {s['lr']:.3g} | "
              f"{'; '.join(s['validation'])} |" for s in summaries]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder or results/runs/<run> (its metrics.jsonl)")
    parser.add_argument("--every", type=int, default=1000, help="episodes (meta-steps; pretraining: steps) per window")
    args = parser.parse_args()
    if args.every < 1:
        parser.error(f"--every must be a positive number of episodes, got {args.every}")
    if not (args.run / "metrics.jsonl").is_file():
        parser.error(f"{args.run / 'metrics.jsonl'}: no such file")
    print(table(windows(read_log(args.run), args.every)))


if __name__ == "__main__":
    main()
