"""scripts/training_fit.py: training rows averaged per window of episodes, validation rows beside them."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_script


def test_windows_average_the_training_rows_they_hold_and_list_their_validation(tmp_path: Path) -> None:
    log = [{"episode": 25, "phase": "train", "accuracy": 90.0, "loss": 0.4, "lr": 1e-3},
           {"episode": 50, "phase": "train", "accuracy": 94.0, "loss": 0.2, "lr": 1e-3},
           {"episode": 50, "phase": "val", "accuracy": 93.5},
           {"episode": 75, "phase": "train", "accuracy": 99.0, "loss": 0.05, "lr": 5e-4},
           {"episode": 100, "phase": "val", "accuracy": 96.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    script = load_script("training_fit")

    summaries = script.windows(script.read_log(tmp_path), every=50)

    assert [(s["start"], s["end"], s["rows"]) for s in summaries] == [(0, 50, 2), (50, 100, 1)]
    assert summaries[0]["accuracy"] == 92.0 and abs(summaries[0]["loss"] - 0.3) < 1e-12
    assert summaries[0]["validation"] == ["93.50 at 50"] and summaries[1]["validation"] == ["96.25 at 100"]
    assert summaries[1]["lr"] == 5e-4
    assert "| 50-100 | 1 | 99.00 | 0.0500 | 0.0005 | 96.25 at 100 |" in script.table(summaries)


def test_a_pretraining_log_is_windowed_by_its_steps(tmp_path: Path) -> None:
    log = [{"epoch": 0.5, "step": 10, "phase": "train", "accuracy": 20.0, "loss": 3.0, "lr": 0.05},
           {"epoch": 1, "step": 20, "phase": "train", "accuracy": 40.0, "loss": 2.0, "lr": 0.04},
           {"epoch": 1, "step": 20, "phase": "val", "accuracy": 66.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    script = load_script("training_fit")

    [summary] = script.windows(script.read_log(tmp_path), every=20)

    assert (summary["end"], summary["rows"], summary["accuracy"], summary["lr"]) == (20, 2, 30.0, 0.04)
    assert summary["validation"] == ["66.00 at 20"]
