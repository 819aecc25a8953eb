"""Calibration and open-set rejection: temperature scaling, ECE/NLL, unknown-class queries stored with the
episodes, AUROC, the threshold at a false-accept rate, and predict's "unknown" through every path."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from fsltool.confidence import auroc, expected_calibration_error, fit_temperature, fit_threshold, negative_log_likelihood, softmax
from fsltool.data.episodes import EpisodeShape
from fsltool.data.pack import pack
from fsltool.data.sources.synthetic import synthetic
from fsltool.data.store import FewShotData
from fsltool.data.unknowns import add_unknowns, stored_unknowns
from tests.conftest import quick_recipe, run_cli, small_plan, trained

SHAPE = EpisodeShape(5, 1, 5)


@pytest.fixture(scope="module")
def open_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's synthetic set, stored with unknown-class queries (prepare --unknowns)."""
    path = tmp_path_factory.mktemp("open") / "open.h5"
    pack(synthetic(classes=60, images_per_class=20), path, replace(small_plan(), unknowns=True), quiet=True)
    return path


@pytest.fixture(scope="module")
def open_run(open_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ProtoNet trained briefly on the open-set file."""
    return trained(quick_recipe(open_file, tmp_path_factory.mktemp("runs") / "protonet", episodes=20))


def test_fitted_temperature_recovers_the_one_labels_were_drawn_at() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 4, size=(20000, 5))
    true_t = 2.5
    labels = np.array([rng.choice(5, p=p) for p in softmax(scores, true_t)])
    fitted = fit_temperature(scores, labels)
    assert abs(fitted - true_t) / true_t < 0.05
    nll = negative_log_likelihood(softmax(scores, fitted), labels)
    assert nll <= min(negative_log_likelihood(softmax(scores, t), labels) for t in (fitted * 0.98, fitted * 1.02))


def test_ece_and_nll_on_a_hand_made_case() -> None:
    probabilities = np.array([[0.9, 0.1], [0.08, 0.92], [0.35, 0.65], [0.3, 0.7]])
    labels = np.array([0, 0, 0, 1])
    # top probabilities 0.9 (right) and 0.92 (wrong) share bin 13 of 15, 0.65 (wrong) bin 9, 0.7 (right) bin 10
    expected_ece = (2 * abs(0.5 - 0.91) + abs(0 - 0.65) + abs(1 - 0.7)) / 4
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected_ece)
    assert negative_log_likelihood(probabilities, labels) == pytest.approx(-(math.log(0.9) + math.log(0.08) + math.log(0.35) + math.log(0.7)) / 4)


def test_auroc_equals_the_hand_counted_pairs() -> None:
    # pairs (known > unknown): 0.9 beats both, 0.8 ties 0.8 (a half) and beats 0.3, 0.4 beats 0.3 only: 4.5 of 6
    assert auroc(np.array([0.9, 0.8, 0.4]), np.array([0.8, 0.3])) == pytest.approx(0.75)
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0


def test_threshold_accepts_the_requested_fraction_of_unknowns() -> None:
    rng = np.random.default_rng(1)
    rate, n = 0.05, 10000
    fitted_on, fresh = rng.random(n), rng.random(n)
    threshold = fit_threshold(fitted_on, rate)
    assert (fitted_on > threshold).mean() == pytest.approx(rate, abs=1 / n)  # exact on the queries it was fitted on
    assert abs((fresh > threshold).mean() - rate) < 3 * math.sqrt(rate * (1 - rate) / n)  # within sampling error elsewhere


def test_unknown_queries_come_from_outside_the_episode_and_equal_when_added_later(open_file: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    pack(synthetic(classes=60, images_per_class=20), plain, small_plan(), quiet=True)
    added = add_unknowns(plain, tmp_path / "added.h5")
    assert sorted(added.added) == ["test/5w1s5q", "test/5w5s5q", "val/5w1s5q", "val/5w5s5q"]
    with FewShotData(open_file) as stored, FewShotData(added.path) as later:
        for split in ("val", "test"):
            unknown = stored_unknowns(stored, split, SHAPE)
            np.testing.assert_array_equal(unknown, stored_unknowns(later, split, SHAPE))
            support, _ = stored.stored_episodes(split, SHAPE)
            class_of = np.searchsorted(stored.class_start, np.concatenate([support, unknown], 1), side="right") - 1
            assert unknown.shape == (30, 25)
            for row in class_of:
                episode, outside = set(row[:5]), row[5:]
                assert not episode & set(outside) and len(set(outside)) == 5 and set(row) <= set(stored.split_classes(split))
    with FewShotData(plain) as data, pytest.raises(Exception, match="fsltool prepare unknowns"):
        stored_unknowns(data, "val", SHAPE)
    with h5py.File(plain) as file:
        assert "unknown" not in file["episodes/val/5w1s5q"]  # the source file is left as it was


def test_calibration_lowers_test_nll_and_evaluate_reports_both(open_run: Path) -> None:
    code, out, err = run_cli("calibrate", str(open_run), "--json")
    assert code == 0, err
    fitted = json.loads(out)
    assert fitted["validation"]["after"]["nll"] <= fitted["validation"]["before"]["nll"]
    code, out, err = run_cli("evaluate", str(open_run), "--calibration", "--open-set", "--json", "-")
    assert code == 0, err
    result = json.loads(out)
    test = result["calibration"]
    assert test["temperature"] == fitted["temperature"] and test["ece_bins"] == 15 and test["queries"] == 750
    assert test["after"]["nll"] < test["before"]["nll"]
    open_set = result["open_set"]
    assert open_set["unknown_queries"] == 750 and 0.5 < open_set["auroc"]["score"] <= 1
    assert open_set["stored_threshold"] is None  # calibrated without --reject-rate
    code, out, err = run_cli("calibrate", str(open_run), "--reject-rate", "0.1", "--json")  # on the top raw score
    assert code == 0, err
    fitted = json.loads(out)
    assert fitted["open_set"]["score"] == "score"
    assert fitted["validation"]["open_set"]["unknown_accepted"] == pytest.approx(0.1, abs=1 / 750)


def _write_images(folder: Path, data: FewShotData, indices: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for index in indices:
        Image.fromarray(np.rint(data.images(np.array([index]))[0, 0].numpy() * 255).astype(np.uint8)).save(folder / f"{index}.png")


def test_predict_marks_queries_below_the_threshold_unknown_and_all_paths_agree(open_run: Path, open_file: Path, tmp_path: Path) -> None:
    code, out, err = run_cli("calibrate", str(open_run), "--reject-rate", "0.2", "--open-set-score", "probability", "--json")
    assert code == 0, err
    fitted = json.loads(out)
    assert fitted["validation"]["open_set"]["unknown_accepted"] == pytest.approx(0.2, abs=1 / 750)
    with FewShotData(open_file) as data:
        support_idx, query_idx = data.stored_episodes("test", SHAPE)
        for c in range(3):
            _write_images(tmp_path / "support" / f"class{c}", data, support_idx[0, c : c + 1])
        _write_images(tmp_path / "queries", data, np.concatenate([query_idx[0, :15], stored_unknowns(data, "test", SHAPE)[0, :10]]))
    support, queries = str(tmp_path / "support"), str(tmp_path / "queries")
    code, out, err = run_cli("predict", str(open_run), support, queries, "--json")
    assert code == 0, err
    torch_path = json.loads(out)["predictions"]
    # A threshold amid these queries' probabilities, so that both answers occur (the digest stays the run's).
    calibration_file = open_run / "calibration.json"
    record = json.loads(calibration_file.read_text())
    ordered = sorted(p["probability"] for p in torch_path)
    record["open_set"]["threshold"] = (ordered[12] + ordered[13]) / 2
    calibration_file.write_text(json.dumps(record))
    code, out, err = run_cli("predict", str(open_run), support, queries, "--json")
    torch_path = json.loads(out)["predictions"]
    for p in torch_path:
        assert p["unknown"] == (p["probability"] <= record["open_set"]["threshold"])  # the threshold is on the top probability
        assert p["label"] == (None if p["unknown"] else p["nearest"])
    assert {p["unknown"] for p in torch_path} == {True, False}
    code, text, err = run_cli("predict", str(open_run), support, queries)
    assert sum(line.split("\t")[1] == "unknown" for line in text.splitlines()) == sum(p["unknown"] for p in torch_path)

    code, _, err = run_cli("enroll", str(open_run), support, "--out", str(tmp_path / "enrolled"))
    assert code == 0, err
    code, _, err = run_cli("export", str(open_run), "--out", str(tmp_path / "export"), "--verify-episodes", "0")
    assert code == 0, err
    assert json.loads((tmp_path / "export" / "model.json").read_text())["calibration"]["temperature"] == record["temperature"]
    for onnx_args in ([str(tmp_path / "enrolled"), queries], [str(tmp_path / "export"), support, queries]):
        code, out, err = run_cli("predict", *onnx_args, "--json")
        assert code == 0, err
        onnx_path = json.loads(out)["predictions"]
        assert [(p["label"], p["unknown"]) for p in onnx_path] == [(p["label"], p["unknown"]) for p in torch_path]
        np.testing.assert_allclose([p["probability"] for p in onnx_path], [p["probability"] for p in torch_path], rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_one_line_errors(open_run: Path, synthetic_file: Path, tmp_path: Path) -> None:
    plain_run = trained(quick_recipe(synthetic_file, tmp_path / "plain", episodes=2))
    loose = tmp_path / "loose.pt"
    loose.write_bytes((plain_run / "checkpoints" / "best.pt").read_bytes())
    for args, named in (
        (["calibrate", str(open_run), "--reject-rate", "0"], "--reject-rate 0.0"),
        (["calibrate", str(open_run), "--reject-rate", "1.5"], "--reject-rate 1.5"),
        (["evaluate", str(plain_run), "--calibration"], "fsltool calibrate"),
        (["calibrate", str(plain_run), "--reject-rate", "0.05"], "fsltool prepare unknowns"),
        (["evaluate", str(open_run), "--open-set", "--sample-seed", "3"], "--sample-seed"),
        (["calibrate", str(loose)], "run folder"),
    ):
        code, _, err = run_cli(*args)
        assert code == 2 and err.count("\n") == 1 and named in err, (args, err)
    assert not (plain_run / "calibration.json").exists()
    assert run_cli("calibrate", str(open_run))[0] == 0
    (plain_run / "calibration.json").write_text((open_run / "calibration.json").read_text())  # other weights' fit
    code, _, err = run_cli("evaluate", str(plain_run), "--calibration")
    assert code == 2 and err.count("\n") == 1 and "fitted on other weights" in err
    small = tmp_path / "small.h5"
    with pytest.raises(Exception, match=r"split 'val' has \d+ classes: unknown-class queries for 3w1s5q"):
        pack(synthetic(classes=20, images_per_class=20), small, replace(small_plan(), unknowns=True, shapes=(EpisodeShape(3, 1, 5),)), quiet=True)
    assert not small.exists()
