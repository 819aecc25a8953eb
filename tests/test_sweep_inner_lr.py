"""scripts/sweep_inner_lr.py: a trained MAML run scored at other inner learning rates and step counts, each cell
exactly what the run would score had its recipe said so; runs whose inner rates are not a setting are refused."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from fsltool.checkpoint import build_model, load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.evaluate import evaluate
from tests.conftest import load_script, quick_recipe, trained



def test_each_cell_scores_as_the_run_rebuilt_with_that_inner_loop(synthetic_file: Path, tmp_path: Path) -> None:
    recipe = quick_recipe(synthetic_file, tmp_path / "maml", method="maml", backbone="conv4-strided", shape="5w1s5q", episodes=2,
                          method_options={"way": 5, "inner_steps": 1, "test_inner_steps": 1, "inner_lr": 0.4})
    run = trained(recipe)
    out = tmp_path / "sweep.json"
    result = CliRunner().invoke(load_script("sweep_inner_lr").main, [str(run), "--shape", "5w1s5q", "--lr", "0.4", "--lr", "2.0", "--steps", "1",
                                                     "--steps", "3", "--episodes", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "inner_lr 0.4, 1 steps:" in result.output and "(the recipe's)" in result.output
    cells = json.loads(out.read_text())["cells"]
    assert [(cell["inner_lr"], cell["steps"]) for cell in cells] == [(0.4, 1), (2.0, 1), (0.4, 3), (2.0, 3)]

    model = load_trained(run)
    config = {**model.config, "method_options": {**model.config["method_options"], "inner_lr": 2.0, "test_inner_steps": 3}}
    reference = build_model(config).eval()
    reference.load_state_dict(model.method.state_dict())
    with FewShotData(synthetic_file) as data:
        expected = evaluate(reference, data, "val", EpisodeShape(5, 1, 5), episodes=4, sample_seed=1)
        as_trained = evaluate(model.method, data, "val", EpisodeShape(5, 1, 5), episodes=4, sample_seed=1)
    assert cells[3]["accuracy"] == expected.accuracy
    assert cells[0]["accuracy"] == as_trained.accuracy
    assert len({cell["accuracy"] for cell in cells}) > 1  # the settings change the scores


def test_a_run_without_a_set_inner_rate_is_refused(trained_run: Path) -> None:
    result = CliRunner().invoke(load_script("sweep_inner_lr").main, [str(trained_run), "--shape", "5w1s5q", "--lr", "0.1"])
    assert result.exit_code != 0 and "a maml run with a set inner_lr is needed (method protonet" in result.output
