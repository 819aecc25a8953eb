"""Checkpoint ensembles (MAML++'s test protocol): the best-validated numbered checkpoints a run keeps
(train.keep_best_checkpoints) and ``evaluate --ensemble N``, which classifies by their mean scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fsltool.checkpoint import load_trained
from fsltool.data.episodes import EpisodeShape, episode_labels
from fsltool.data.store import FewShotData
from fsltool.evaluate import episode_scores, evaluate
from fsltool.runs import RunFolder
from fsltool.train import meta_train
from tests.conftest import quick_recipe, run_cli, trained


def folder_with_validations(path: Path, accuracies: dict[int, float]) -> RunFolder:
    """A run folder holding an (empty) numbered checkpoint and a validation row for each count."""
    run = RunFolder(path)
    run.checkpoints.mkdir(parents=True)
    for count, accuracy in accuracies.items():
        run.numbered_checkpoint("episode", count).touch()
        run.log({"episode": count, "phase": "train", "loss": 1.0})
        run.log({"episode": count, "phase": "val", "accuracy": accuracy})
    return run


def kept(run: RunFolder) -> list[str]:
    return [path.name for path in run.numbered()]


def test_pruning_keeps_the_newest_and_the_best_validated(tmp_path: Path) -> None:
    run = folder_with_validations(tmp_path / "run", {10: 90.0, 20: 97.0, 30: 95.0, 40: 97.0, 50: 91.0, 60: 92.0})
    assert [(path.name, score) for path, score in run.best_validated(3)] == [
        ("episode-00000040.pt", 97.0), ("episode-00000020.pt", 97.0), ("episode-00000030.pt", 95.0)]  # a tie: the later first
    run.prune(keep=1, keep_best=2)
    assert kept(run) == ["episode-00000020.pt", "episode-00000040.pt", "episode-00000060.pt"]
    run.prune(keep=0, keep_best=1)
    assert kept(run) == ["episode-00000040.pt"]


def test_a_checkpoint_without_a_validation_row_is_never_among_the_best(tmp_path: Path) -> None:
    run = folder_with_validations(tmp_path / "run", {10: 90.0})
    run.numbered_checkpoint("episode", 20).touch()  # e.g. the log was cut back past it
    assert [path.name for path, _ in run.best_validated(5)] == ["episode-00000010.pt"]
    run.prune(keep=0, keep_best=5)
    assert kept(run) == ["episode-00000010.pt"]


@pytest.fixture(scope="module")
def ensemble_run(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 episodes validated every 2 (six validations), keeping the newest numbered checkpoint and the 3 best."""
    output = tmp_path_factory.mktemp("runs") / "ensemble"
    return trained(quick_recipe(synthetic_file, output, episodes=12, keep_checkpoints=1, keep_best_checkpoints=3, lr=0.01), 2)


def test_training_keeps_the_best_validated_checkpoints(ensemble_run: Path) -> None:
    rows = [json.loads(line) for line in (ensemble_run / "metrics.jsonl").read_text().splitlines()]
    scores = {row["episode"]: row["accuracy"] for row in rows if row["phase"] == "val"}
    assert sorted(scores) == [2, 4, 6, 8, 10, 12]
    best = sorted(scores, key=lambda count: (scores[count], count), reverse=True)[:3]
    assert kept(RunFolder(ensemble_run)) == [f"episode-{count:08d}.pt" for count in sorted({*best, 12})]
    for count in best:  # each kept checkpoint holds the weights that were validated at its count
        assert torch.load(ensemble_run / "checkpoints" / f"episode-{count:08d}.pt", weights_only=False)["episode"] == count


def test_an_ensemble_classifies_by_its_members_mean_scores(ensemble_run: Path, synthetic_file: Path) -> None:
    members = [load_trained(path).method for path, _ in RunFolder(ensemble_run).best_validated(2)]
    shape = EpisodeShape(5, 1, 5)
    with FewShotData(synthetic_file) as data:
        support, query = data.stored_episodes("test", shape)
        scores = [episode_scores(member, data, shape, support, query) for member in members]
        result = evaluate(members, data, "test", shape)
        alone = [evaluate(member, data, "test", shape) for member in members]
    assert not torch.equal(scores[0], scores[1])
    expected = ((scores[0] + scores[1]) / 2).argmax(-1) == episode_labels(shape)[1]
    assert result.accuracies.tolist() == pytest.approx(expected.float().mean(-1).tolist())
    assert result.ensemble == 2 and result.to_json()["ensemble"] == 2 and alone[0].ensemble == 1
    with FewShotData(synthetic_file) as data:
        assert evaluate(members[:1], data, "test", shape).accuracies.tolist() == alone[0].accuracies.tolist()


def test_evaluate_ensemble_scores_the_best_validated_checkpoints(ensemble_run: Path) -> None:
    code, out, err = run_cli("evaluate", str(ensemble_run), "--ensemble", "3", "--transductive", "--json", "-")
    assert code == 0, err
    payload = json.loads(out)
    chosen = RunFolder(ensemble_run).best_validated(3)
    assert payload["checkpoint"] == [str(path) for path, _ in chosen]
    assert payload["validation_accuracy"] == [score for _, score in chosen]
    assert payload["ensemble"] == 3 and payload["transductive"] is True
    latest = max(torch.load(path, weights_only=False)["elapsed"] for path, _ in chosen)
    assert payload["training"]["seconds"] == round(latest, 1)  # the budget the ensemble took: its latest member's
    code, out, err = run_cli("evaluate", str(ensemble_run), "--ensemble", "3")
    assert code == 0 and "ensemble of 3 checkpoints" in out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ensemble", "4"], "--ensemble 4 needs 4 numbered checkpoints with a validation score, the run kept 3"),
        (["--ensemble", "2", "--checkpoint", "last"], "does not go with --checkpoint"),
        (["--ensemble", "2", "--untrained"], "does not go with --calibration, --open-set, --untrained"),
        (["--ensemble", "0"], "0 is not in the range x>=1"),
    ],
)
def test_evaluate_ensemble_refuses_what_it_cannot_score(ensemble_run: Path, args: list[str], message: str) -> None:
    code, out, err = run_cli("evaluate", str(ensemble_run), *args)
    assert code == 2 and message in " ".join(err.split()), err
    assert out == ""


def test_evaluate_ensemble_needs_a_run_folder(ensemble_run: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("evaluate", str(ensemble_run / "checkpoints" / "last.pt"), "--ensemble", "2")
    assert code == 2 and "--ensemble takes a run folder" in err
    code, _, err = run_cli("evaluate", str(tmp_path / "none"), "--ensemble", "2")
    assert code == 2 and "no such run folder" in err




def test_an_edited_metrics_log_is_a_one_line_error_naming_its_line(ensemble_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "edited"
    shutil.copytree(ensemble_run, copy)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join([*lines[:2], '{"episode": 4, "phase": "val", "accu', *lines[2:]]) + "\n")
    code, out, err = run_cli("evaluate", str(copy), "--ensemble", "2")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "metrics.jsonl: line 3 is not a metrics row" in err, err
    (copy / "metrics.jsonl").write_text("\n".join([*lines[:2], "[4, 97.5]", *lines[2:]]) + "\n")
    code, _, err = run_cli("plot", "curves", str(copy), "--out", str(tmp_path / "curves.png"))
    assert code == 2 and "metrics.jsonl: line 3 is not a metrics row (a JSON object)" in err, err
    assert not (tmp_path / "curves.png").exists()


def test_pruning_keeps_every_checkpoint_while_fewer_than_keep(tmp_path: Path) -> None:
    run = folder_with_validations(tmp_path / "run", {10: 90.0, 20: 80.0})
    run.prune(keep=3)
    assert kept(run) == ["episode-00000010.pt", "episode-00000020.pt"]


@pytest.mark.parametrize(
    ("method", "options"),
    [("protonet", {}),
     ("maml", {"way": 5, "inner_steps": 1, "test_inner_steps": 1, "per_step_bn": True, "learn_inner_lr": True})],
)
def test_how_often_a_run_validates_does_not_change_its_training(synthetic_file: Path, tmp_path: Path, method: str,
                                                               options: dict[str, object]) -> None:
    """Validation draws on no training randomness and moves no training state (BatchNorm statistics included), so
    the ensemble's members lie on one trajectory whatever validation.every the recipe sets; and under a constant
    learning rate a shorter budget ends exactly where a longer run was at that count."""
    def trained_to(episodes: int, every: int, count: int) -> dict[str, torch.Tensor]:
        recipe = quick_recipe(synthetic_file, tmp_path / f"{episodes}-every-{every}", method=method, method_options=options,
                              backbone="conv4-strided", shape="5w1s5q", episodes=episodes, lr=0.01, keep_checkpoints=4)
        recipe.validation.every = every
        meta_train(recipe, quiet=True)
        return torch.load(RunFolder(recipe.output).numbered_checkpoint("episode", count), weights_only=False)["model"]

    often, seldom, shorter = trained_to(4, 1, 4), trained_to(4, 4, 4), trained_to(2, 2, 2)
    at_2 = torch.load(tmp_path / "4-every-1" / "checkpoints" / "episode-00000002.pt", weights_only=False)["model"]
    for key in often:
        assert torch.equal(often[key], seldom[key]), key
        assert torch.equal(at_2[key], shorter[key]), key
    assert any(not torch.equal(often[key], at_2[key]) for key in often)  # the runs did train
