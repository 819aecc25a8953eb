"""`meta-train --branch-from`: a new run from another run's checkpoint, exact where the schedules agree."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fsltool.checkpoint import load_checkpoint
from fsltool.errors import FsltoolError
from fsltool.info import describe
from fsltool.train import meta_train
from tests.conftest import quick_recipe, run_cli, trained


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def logged(run: Path, phase: str) -> list[dict]:
    return [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if row["phase"] == phase]


@pytest.fixture(scope="module")
def source(synthetic_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 episodes halving the learning rate every 2, validated and checkpointed every 2 (all kept)."""
    run = tmp_path_factory.mktemp("source") / "run"
    return trained(quick_recipe(synthetic_file, run, episodes=8, lr_step=2, lr=0.01, keep_checkpoints=10), 2)


def test_a_branch_ends_exactly_as_the_new_recipe_run_from_scratch(source: Path, synthetic_file: Path, tmp_path: Path) -> None:
    """Halving every 4 episodes agrees with halving every 2 on the first 2 episodes: branched from episode 2 of the
    source, 10 episodes of the new schedule end with exactly the parameters of that recipe trained from scratch,
    with the source's log up to episode 2 and the same log rows after it."""
    trained(quick_recipe(synthetic_file, tmp_path / "scratch", episodes=10, lr_step=4, lr=0.01), 2)
    trained(quick_recipe(synthetic_file, tmp_path / "branch", episodes=10, lr_step=4, lr=0.01), 2,
            branch_from=source / "checkpoints" / "episode-00000002.pt")
    scratch, branch = weights(tmp_path / "scratch"), weights(tmp_path / "branch")
    for key in scratch:
        assert torch.equal(scratch[key], branch[key]), key
    def rows(run: Path) -> list[tuple]:  # a row's lr is the next step's: the branch point's row is the source's
        return [(row["episode"], row["loss"], row["lr"] if row["episode"] > 2 else None) for row in logged(run, "train")]
    assert rows(tmp_path / "branch") == rows(tmp_path / "scratch")
    assert [row["episode"] for row in logged(tmp_path / "branch", "val")] == [2, 4, 6, 8, 10]
    origin = describe(tmp_path / "branch")["branched_from"]
    assert origin == {"checkpoint": str(source / "checkpoints" / "episode-00000002.pt"), "episode": 2}
    assert (tmp_path / "branch" / "checkpoints" / "best.pt").is_file()


def test_the_source_run_is_left_as_it_was(source: Path, synthetic_file: Path, tmp_path: Path) -> None:
    before = {path.name: path.read_bytes() for path in (source / "checkpoints").iterdir()}
    log = (source / "metrics.jsonl").read_bytes()
    meta_train(quick_recipe(synthetic_file, tmp_path / "longer", episodes=12, lr_step=2, lr=0.01), quiet=True, branch_from=source)
    assert {path.name: path.read_bytes() for path in (source / "checkpoints").iterdir()} == before
    assert (source / "metrics.jsonl").read_bytes() == log
    assert load_checkpoint(tmp_path / "longer" / "checkpoints" / "last.pt")["episode"] == 12


def scored_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """The branch's own validations score 0%: none beats a carried best."""
    monkeypatch.setattr("fsltool.loop.evaluate", lambda *args, **kwargs: SimpleNamespace(accuracy=0.0, ci95=0.0, accuracies=[0.0]))


def test_the_best_validation_is_carried_with_its_checkpoint(source: Path, synthetic_file: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Branched from its last.pt with the same validation, the run keeps the source's best so far, and a copy of
    that checkpoint as best.pt, until one of its own validations beats it."""
    best = load_checkpoint(source / "checkpoints" / "last.pt")["best"]
    scored_zero(monkeypatch)
    trained(quick_recipe(synthetic_file, tmp_path / "run", episodes=10, lr_step=2, lr=0.01), 2, branch_from=source)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["best"] == best
    source_best = source / "checkpoints" / f"episode-{best['episode']:08d}.pt"
    assert (tmp_path / "run" / "checkpoints" / "best.pt").read_bytes() == source_best.read_bytes()


def test_with_another_validation_the_branch_chooses_its_own_best(source: Path, synthetic_file: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores on other validation episodes are not comparable: best.pt comes from the branch's own validations."""
    scored_zero(monkeypatch)
    recipe = quick_recipe(synthetic_file, tmp_path / "run", episodes=10, lr_step=2, lr=0.01)
    recipe.validation.every, recipe.validation.episodes = 2, 5
    meta_train(recipe, quiet=True, branch_from=source)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["episode"] == 10
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["best"]["episode"] == 10


@pytest.mark.parametrize(("settings", "message"), [
    ({"lr_step": 1}, "schedule gives episode 2 another rate"),
    ({"lr_step": 2, "lr": 0.02}, "'train.lr' is 0.02 here but 0.01"),
    ({"lr_step": 2, "shape": "5w1s5q"}, "'train.shape' is '5w1s5q' here but '10w1s5q'"),
    ({"lr_step": 2, "episodes": 4}, "already trained 4 episodes"),
])
def test_a_branch_that_would_not_be_exact_is_refused_before_anything_is_written(
        source: Path, synthetic_file: Path, tmp_path: Path, settings: dict, message: str) -> None:
    settings = {"episodes": 12, "lr": 0.01, **settings}
    with pytest.raises(FsltoolError, match=message):
        meta_train(quick_recipe(synthetic_file, tmp_path / "branch", **settings), quiet=True,
                   branch_from=source / "checkpoints" / "episode-00000004.pt")
    assert not (tmp_path / "branch").exists()


def test_the_cli_branches_and_refuses_a_branch_into_its_own_folder_or_with_resume(source: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("meta-train", str(source / "recipe.yaml"), "train.episodes=10", "train.lr_step=1", f"output={tmp_path / 'branch'}",
                           "--branch-from", str(source), "--check")
    assert code == 2 and "another rate" in err and not (tmp_path / "branch").exists()
    code, _, err = run_cli("meta-train", str(source / "recipe.yaml"), "train.episodes=10", f"output={tmp_path / 'branch'}",
                           "--branch-from", str(source), "--check")
    assert code == 0 and "a valid branch point (episode 8 of 10)" in err and not (tmp_path / "branch").exists()
    code, _, err = run_cli("meta-train", str(source / "recipe.yaml"), "train.episodes=10", f"output={tmp_path / 'branch'}",
                           "--branch-from", str(source), "-q")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "branch" / "checkpoints" / "last.pt")["episode"] == 10
    code, _, err = run_cli("meta-train", str(source / "recipe.yaml"), "train.episodes=12", "--branch-from", str(source))
    assert code == 2 and "a branch starts a new run folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("meta-train", str(source / "recipe.yaml"), "train.episodes=12", "--branch-from", str(source), "--resume")
    assert code == 2 and "give one" in err
    assert load_checkpoint(source / "checkpoints" / "last.pt")["episode"] == 8
