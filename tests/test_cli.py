"""The whole pipeline through the command line, and the promise for bad input: one line, exit 2, no output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from fsltool import __version__
from fsltool.cli import main
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


run = run_cli


def test_prepare_train_evaluate_export_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "syn.h5"
    code, _, err = run("prepare", "synthetic", str(data), "--classes", "40", "--shapes", "5w1s,5w5s", "--query", "5", "--episodes", "20", "-q")
    assert code == 0, err
    run_dir = tmp_path / "run"
    code, out, err = run("meta-train", str(REPO / "recipes/synthetic/protonet-quick.yaml"), f"data={data}", f"output={run_dir}",
                         "train.episodes=6", "train.shape=10w1s5q", "validation.every=3", "validation.episodes=10",
                         "validation.shape=5w1s5q", "test_shape=5w1s5q", "-q")
    assert code == 0, err
    assert "run folder" in out and (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "recipe.yaml").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {row["phase"] for row in rows} == {"train", "val"}

    result_file = tmp_path / "result.json"
    code, out, err = run("evaluate", str(run_dir), "--json", str(result_file))
    assert code == 0, err
    result = json.loads(result_file.read_text())
    assert result["episodes"] == 20 and (result["way"], result["shot"], result["query"]) == (5, 1, 5)
    assert 0 <= result["accuracy"] <= 100 and result["ci95"] > 0
    assert f"{result['accuracy']:.2f} ± {result['ci95']:.2f}%" in out
    budget = result["training"]  # the best checkpoint's: validated every 3 episodes of 6
    assert {key: budget[key] for key in ("stage", "meta_batch", "shape", "splits", "init", "init_scope")} == {
        "stage": "meta-train", "meta_batch": 1, "shape": "10w1s5q", "splits": ["train"], "init": None, "init_scope": None}
    assert budget["episodes"] in (3, 6) and budget["seconds"] > 0
    assert len(budget["machines"]) == 1 and " cores, torch " in budget["machines"][0]

    code, out, err = run("evaluate", str(run_dir), "--shape", "5w5s5q", "--json", "-")
    assert code == 0 and json.loads(out)["shot"] == 5
    code, out, err = run("evaluate", str(run_dir), "--untrained", "--json", "-")
    assert code == 0 and json.loads(out)["checkpoint"] == "untrained" and json.loads(out)["training"] is None
    assert json.loads(out)["accuracy"] != result["accuracy"]

    code, out, err = run("export", str(run_dir), "--verify-episodes", "5")
    assert code == 0, err
    assert "prediction agreement 100.00%" in out and "CPUExecutionProvider" in out
    assert (run_dir / "export" / "classifier.onnx").is_file()

    for target, kind in ((data, "data file"), (run_dir, "run folder"), (run_dir / "export", "export folder"),
                         (run_dir / "export" / "classifier.onnx", "onnx model"), (run_dir / "checkpoints" / "last.pt", "checkpoint")):
        code, out, err = run("info", str(target), "--json")
        assert code == 0, err
        assert json.loads(out)["kind"] == kind
    code, out, err = run("info", str(run_dir))  # the view is the result: on stdout, to pipe and redirect
    assert code == 0 and "'status': 'finished'" in out and "'episodes_trained': 6" in out and not err
    finished = json.loads(run("info", str(run_dir), "--json")[1])
    assert (finished["episodes_trained"], finished["episodes_planned"], finished["status"]) == (6, 6, "finished")
    assert "resume" not in finished and finished["latest_validation"]["episode"] == 6
    recipe_file = run_dir / "recipe.yaml"  # as a resume with train.episodes=9 leaves it when stopped before a checkpoint
    recipe_file.write_text(recipe_file.read_text().replace("episodes: 6\n", "episodes: 9\n", 1))
    raised = json.loads(run("info", str(run_dir), "--json")[1])
    assert (raised["episodes_trained"], raised["episodes_planned"], raised["status"]) == (6, 9, "stopped")
    assert raised["resume"] == f"fsltool meta-train {recipe_file} --resume"

    code, out, err = run("meta-train", str(REPO / "recipes/synthetic/protonet-quick.yaml"), f"data={data}", "--check")
    assert code == 2 and "no stored val episodes of shape 5w1s15q (stored: 5w1s5q, 5w5s5q)" in " ".join(err.split())
    code, out, err = run("meta-train", str(REPO / "recipes/synthetic/protonet-quick.yaml"), f"data={data}", "--check",
                         "validation.shape=5w1s5q", "test_shape=5w5s5q")
    assert code == 0 and "recipe is valid" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prepare", "omniglot", "{tmp}/nowhere", "{tmp}/out.h5"], "nowhere"),
        (["prepare", "synthetic", "{tmp}/out.h5", "--classes", "2"], "--classes"),
        (["prepare", "synthetic", "{tmp}/out.h5", "--classes", "20", "--shapes", "5w1s", "--episode-splits", "val,holdout"], "unknown split 'holdout'"),
        (["prepare", "synthetic", "{tmp}/out.h5", "--classes", "40", "--shapes", "5w19s"], "fewer than shot + query"),
        (["prepare", "synthetic", "{tmp}/out.h5", "--shapes", "5w1x"], "not of the form"),
        (["prepare", "synthetic", "{tmp}/missing/out.h5"], "output folder does not exist"),
        (["meta-train", "{tmp}/missing.yaml"], "missing.yaml: no such recipe file, nor a built-in recipe"),
        (["meta-train", str(REPO / "recipes/synthetic/protonet-quick.yaml"), "train.lr=fast"], "'train.lr'"),
        (["meta-train", str(REPO / "recipes/synthetic/protonet-quick.yaml"), "data={tmp}/none.h5"], "none.h5: data file not found"),
        (["evaluate", "{tmp}/no-run"], "no such run folder"),
        (["export", "{tmp}/no-run"], "no such run folder"),
        (["info", "{tmp}/nothing"], "no such file or folder"),
        (["predict", "{tmp}/no-run", "{tmp}", "{tmp}"], "no such run folder"),
    ],
)
def test_bad_input_gives_one_line_exit_2_and_no_output(tmp_path: Path, args: list[str], message: str) -> None:
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert code == 2
    assert message in " ".join(err.split()), err
    assert err.strip().startswith("error:") and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in group.commands.items():
        found.append(((*prefix, name), command))
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
    return found


@pytest.mark.parametrize(("path", "command"), _commands(main), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_command_help_shows_an_example(path: tuple[str, ...], command: click.Command) -> None:
    code, out, _ = run(*path, "--help")
    assert code == 0 and "Example: fsltool " in out


def test_json_and_quiet_for_scripts(trained_run: Path, tmp_path: Path) -> None:
    code, out, err = run("prepare", "synthetic", str(tmp_path / "s.h5"), "--classes", "30", "--shapes", "5w1s", "--query", "5",
                         "--episodes", "5", "--json")
    assert code == 0 and json.loads(out)["classes"] == 30 and err == ""
    code, out, err = run("evaluate", str(trained_run), "--quiet")
    assert code == 0 and err == "" and out.startswith("accuracy ")
    code, out, err = run("export", str(trained_run), "--out", str(tmp_path / "export"), "--verify-episodes", "3", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["verification"]["agreement"] == 1.0 and 0 <= report["verification"]["accuracy"] <= 100
    assert {Path(p).name for p in report["files"]} >= {"classifier.onnx", "embedding.onnx", "model.json"}
    code, out, err = run("export", str(trained_run), "--out", str(tmp_path / "export"), "--verify-episodes", "0", "-q")
    assert code == 0 and err == "" and out.strip().endswith("classifier.onnx")
    code, out, err = run("meta-train", str(REPO / "recipes/synthetic/protonet-quick.yaml"), f"data={tmp_path / 's.h5'}",
                         f"output={tmp_path / 'run'}", "train.episodes=2", "train.shape=5w1s5q", "validation.every=2",
                         "validation.episodes=5", "validation.shape=5w1s5q", "test_shape=5w1s5q", "--json")
    assert code == 0 and err == "" and json.loads(out)["episodes"] == 2


def test_python_dash_m_and_version() -> None:
    result = subprocess.run([sys.executable, "-m", "fsltool", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in result.stdout
    result = subprocess.run([sys.executable, "-m", "fsltool", "evaluate", "/no/such/run"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no such run folder" in result.stderr
