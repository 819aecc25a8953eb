"""Carry an unfinished long run to the next machine when runs/ does not survive (a fresh checkout per sitting).

    python scripts/park_run.py park runs/omniglot/reptile-5w5s-100k     # a stopped run -> results/parked/...
    python scripts/park_run.py unpark runs/omniglot/reptile-5w5s-100k   # results/parked/... -> the run folder
    fsltool meta-train runs/omniglot/reptile-5w5s-100k/recipe.yaml --resume   # continues exactly

`park` copies what an exact resume needs (recipe.yaml, metrics.jsonl, checkpoints/last.pt and best.pt), and the
best-validated numbered checkpoints a recipe keeps for `evaluate --ensemble` (train.keep_best_checkpoints), to
results/parked/<the folder's path>/, to be committed; a running run is refused (stop it first: its last checkpoint
is what moves), and so is one whose files take more than --max-mb (50 MB: the history keeps them). `unpark` copies
them back and refuses to overwrite a folder that already holds a checkpoint. `drop` deletes a parked copy once the
run has finished and its evidence is in results/runs/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import yaml

from fsltool.folder_lock import lock_holder
from fsltool.recipe import recipe_from_dict
from fsltool.runs import RunFolder

PARKED = Path("results/parked")
MAX_MB = 50.0  # GitHub warns at 50 MB a file and refuses 100 MB, and each parking stays in the history


def parked_copy(folder: Path, parked_root: Path) -> RunFolder:
    """The parked twin of a run folder given relative to the repository (e.g. runs/omniglot/NAME)."""
    if folder.is_absolute() or ".." in folder.parts:
        raise click.ClickException(f"{folder}: give the run folder relative to the repository, e.g. runs/omniglot/NAME")
    return RunFolder(parked_root / folder)


def resumable_files(run: RunFolder) -> list[Path]:
    """What an exact resume needs of ``run`` (recipe, log, last and best checkpoints) and its ensemble's members."""
    named = [getattr(run, name) for name in ("recipe", "metrics", "last", "best")]
    return [path for path in named if path.is_file()] + ensemble_members(run)


def copy_run(source: RunFolder, target: RunFolder) -> list[Path]:
    """Copy the files of an exact resume from ``source`` to ``target``; the files written."""
    target.checkpoints.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(path, target.path / path.relative_to(source.path))) for path in resumable_files(source)]


def ensemble_members(run: RunFolder) -> list[Path]:
    """The best-validated numbered checkpoints the run's recipe keeps (``keep_best_checkpoints`` of its train or
    pretrain section): what ``evaluate --ensemble`` scores, which last.pt alone cannot give back."""
    if not run.recipe.is_file():
        return []
    recipe = recipe_from_dict(yaml.safe_load(run.recipe.read_text()))
    return [path for path, _ in run.best_validated(max(recipe.train.keep_best_checkpoints, recipe.pretrain.keep_best_checkpoints))]


def park(folder: Path, parked_root: Path = PARKED, max_mb: float = MAX_MB) -> list[Path]:
    run, target = RunFolder(folder), parked_copy(folder, parked_root)
    if not run.last.is_file():
        raise click.ClickException(f"{folder}: no checkpoint to park ({run.last} is missing)")
    holder = lock_holder(folder)
    if holder is not None:
        raise click.ClickException(f"{folder}: still running (pid {holder}); stop it first, then park its last checkpoint")
    megabytes = sum(path.stat().st_size for path in resumable_files(run)) / 2**20
    if megabytes > max_mb:
        raise click.ClickException(
            f"{folder}: its resumable files take {megabytes:.1f} MB (last.pt {run.last.stat().st_size / 2**20:.1f} MB), more "
            f"than --max-mb {max_mb:g}: too large for the repository, whose history keeps every parked copy; keep the run "
            "on a machine that keeps runs/, or plan to rerun it")
    if target.path.exists():
        shutil.rmtree(target.path)  # the previous sitting's copy: this one is newer
    return copy_run(run, target)


def unpark(folder: Path, parked_root: Path = PARKED) -> list[Path]:
    source, run = parked_copy(folder, parked_root), RunFolder(folder)
    if not source.last.is_file():
        raise click.ClickException(f"{source.path}: nothing parked for {folder}")
    if run.last.exists():
        raise click.ClickException(f"{folder}: already holds a checkpoint; move it away to unpark the parked copy")
    return copy_run(source, run)


def drop(folder: Path, parked_root: Path = PARKED) -> list[Path]:
    source = parked_copy(folder, parked_root)
    if not source.path.is_dir():
        raise click.ClickException(f"{source.path}: nothing parked for {folder}")
    shutil.rmtree(source.path)
    return [source.path]


FOLDER = click.argument("folder", type=click.Path(path_type=Path))
PARKED_ROOT = click.option("--parked", "parked_root", type=click.Path(path_type=Path), default=PARKED, show_default=True,
                           help="where parked runs are kept")


def report(action: str, paths: list[Path]) -> None:
    for path in paths:
        click.echo(f"{action}: {path}")


@click.group()
def main() -> None:
    """Park a stopped run's resumable files in the repository, or bring them back."""


@main.command("park")
@FOLDER
@PARKED_ROOT
@click.option("--max-mb", type=float, default=MAX_MB, show_default=True,
              help="refuse a run whose resumable files take more (they go into the repository's history)")
def park_command(folder: Path, parked_root: Path, max_mb: float) -> None:
    """Copy a stopped run's resumable files to the parked folder."""
    report("park", park(folder, parked_root, max_mb))


@main.command("unpark")
@FOLDER
@PARKED_ROOT
def unpark_command(folder: Path, parked_root: Path) -> None:
    """Copy a parked run back to its run folder."""
    report("unpark", unpark(folder, parked_root))


@main.command("drop")
@FOLDER
@PARKED_ROOT
def drop_command(folder: Path, parked_root: Path) -> None:
    """Delete a parked copy (the run has finished and its evidence is in results/runs/)."""
    report("drop", drop(folder, parked_root))


if __name__ == "__main__":
    main()
