"""The PNG figures: learning curves of a run and a stored episode with a model's predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.evaluate import episode_accuracies
from fsltool.plots import stored_episode_view
from tests.conftest import run_cli


def invoke(*args: str) -> tuple[int, str]:
    code, _, err = run_cli(*args)
    return code, err


def test_learning_curves_png(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    code, err = invoke("plot", "curves", str(trained_run), "--out", str(out))
    assert code == 0, err
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 800


def test_curves_of_a_folder_without_metrics_is_one_line_error(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    code, err = invoke("plot", "curves", str(tmp_path), "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and "metrics.jsonl" in err and not out.exists()


def test_episode_predictions_are_the_evaluated_ones(trained_run: Path, synthetic_file: Path) -> None:
    trained = load_trained(trained_run)
    view = stored_episode_view(synthetic_file, "test", "5w1s5q", 4, trained)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", EpisodeShape(5, 1, 5))
        accuracy = episode_accuracies(trained.method, data, EpisodeShape(5, 1, 5), support[4:5], query[4:5])[0]
        np.testing.assert_array_equal(view.query, data.images(query[4]).numpy())
    assert view.predictions is not None
    assert np.mean(view.predictions == np.repeat(np.arange(5), 5)) == pytest.approx(accuracy, abs=1e-6)


def test_episode_grid_png_and_bad_index(trained_run: Path, synthetic_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "episode.png"
    code, err = invoke("plot", "episode", str(trained_run), "--shape", "5w5s5q", "--index", "1", "--out", str(out))
    assert code == 0, err
    with Image.open(out) as image:
        assert image.format == "PNG"
    before = out.read_bytes()
    code, err = invoke("plot", "episode", str(synthetic_file), "--shape", "5w5s5q", "--index", "30", "--out", str(out))
    assert code == 2 and "--index 30 is out of range (30 stored test 5w5s5q episodes)" in err
    assert out.read_bytes() == before  # the earlier figure is untouched
    code, err = invoke("plot", "episode", str(synthetic_file), "--shape", "5w5s5q", "--out", str(out))
    assert code == 0 and out.read_bytes() != before
