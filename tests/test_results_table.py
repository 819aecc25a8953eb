"""scripts/results_table.py: each result's row reads the committed evidence of the run it names, up to the
checkpoint it tested, and names the protocol the data file records."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import load_script


def write_result(root: Path, name: str, **result: object) -> None:
    base = {"accuracy": 99.0, "ci95": 0.1, "query": 15, "episodes": 600, "episodes_from": "stored", "way": 5, "shot": 5,
            "run": "runs/omniglot/snail-5w5s-x"}
    (root / f"omniglot-snail-5w5s-{name}.json").write_text(json.dumps({**base, **result}))


def test_a_continued_run_reports_each_test_at_its_own_budget_and_protocol(tmp_path: Path) -> None:
    evidence = tmp_path / "runs" / "snail-5w5s-x"
    evidence.mkdir(parents=True)
    log = [{"episode": n, "phase": "val", "accuracy": 99.0, "elapsed": 60.0 * n, "shape": "5w5s15q"} for n in (10, 20)]
    (evidence / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    recipe = {"train": {"meta_batch": 8, "shape": "5w5s5q", "splits": ["train"], "augment": {"kind": "class_rot90"}}}
    (evidence / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    protocol = {"class_split": "random", "class_split_seed": 1, "class_split_counts": [1150, 50, 423], "rotated_splits": []}
    write_result(tmp_path, "at10", checkpoint="runs/omniglot/snail-5w5s-x/checkpoints/last.pt", training={"episodes": 10}, **protocol)
    write_result(tmp_path, "at20", checkpoint="runs/omniglot/snail-5w5s-x/checkpoints/last.pt", training={"episodes": 20})
    write_result(tmp_path, "best", checkpoint="runs/omniglot/snail-5w5s-x/checkpoints/best.pt", training={"episodes": 10})
    numbered = "runs/omniglot/snail-5w5s-x/checkpoints/episode-00000010.pt"  # evaluate given a checkpoint file
    write_result(tmp_path, "file10", run=numbered, checkpoint=numbered, training={"episodes": 10})

    lines = [line for _, _, line, _ in load_script("results_table").rows(tmp_path)]
    assert len(lines) == 4
    file10, at10 = sorted((line for line in lines if "10 × 8" in line), key=lambda line: "random class split" in line)
    assert "random class split (seed 1) of 1150/50/423 characters; no rotated classes; class_rot90 augmentation" in at10
    assert at10.endswith("| 10 min |")  # the log up to the tested checkpoint, not the run continued after it
    assert file10.endswith("| 10 min |")  # a numbered checkpoint's row reads its run's evidence up to that checkpoint
    assert sum("20 × 8" in line and line.endswith("| 20 min |") for line in lines) == 2  # last at 20, and best: the whole run


def test_a_run_started_from_another_runs_checkpoint_names_that_run(tmp_path: Path) -> None:
    evidence = tmp_path / "runs" / "snail-5w5s-x"
    evidence.mkdir(parents=True)
    (evidence / "metrics.jsonl").write_text(json.dumps({"episode": 10, "phase": "val", "accuracy": 99.0, "elapsed": 60.0, "shape": "5w5s15q"}) + "\n")
    recipe = {"train": {"meta_batch": 8, "shape": "5w5s5q"}, "init_scope": "model",
              "init": "runs/omniglot/snail-5w5s-source/checkpoints/last.pt"}
    (evidence / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    write_result(tmp_path, "x", checkpoint="runs/omniglot/snail-5w5s-x/checkpoints/last.pt")
    write_result(tmp_path, "copies", checkpoint="runs/omniglot/snail-5w5s-x/checkpoints/last.pt", support_copies=5)
    table = load_script("results_table")

    plain, copies = sorted((line for _, _, line, _ in table.rows(tmp_path)), key=lambda line: "copies" in line)
    assert ", from snail-5w5s-source/last.pt (every layer) |" in plain and "support copies" not in plain
    assert "99.00 ± 0.10 (5 augmented support copies)" in copies
    assert table.init_label("results/runs/reptile-5w5s-reference-100k/episode-00030000.pt") == "reptile-5w5s-reference-100k/episode-00030000.pt"
    assert table.init_label("runs/omniglot/pretrain-conv4") == "pretrain-conv4"  # a run folder: its own name
    assert table.init_label("results/init/reptile-5w5s-100k-episode-30000.pt") == "reptile-5w5s-100k-episode-30000.pt"
