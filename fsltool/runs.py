"""A training run's folder (resolved recipe, metrics log, checkpoints), its log windows, and the check that a
resumed run is the run that was started. Shared by meta-training (counted in episodes, i.e. meta-steps) and
pretraining (counted in optimizer steps, checkpointed by epoch)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fsltool.atomic import atomic_write
from fsltool.disk import write_error
from fsltool.errors import FsltoolError
from fsltool.recipe import RESUMABLE_KEYS, Recipe, dump_recipe, recipe_from_dict


class RunFolder:
    """The files of one run: resolved recipe, metrics log (JSON lines), checkpoints."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.recipe = self.path / "recipe.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"

    def create(self, *, resume: bool, force: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise FsltoolError(f"{self.path}: output exists and is not a folder")
        if resume:
            if not self.last.is_file():
                raise FsltoolError(f"{self.path}: nothing to resume (no {self.last})")
            for leftover in self.checkpoints.glob(".*.partial"):  # a write cut short by a kill
                leftover.unlink(missing_ok=True)
            return
        if self.last.exists() and not force:
            raise FsltoolError(f"{self.path}: run folder already holds a trained run (use --resume to continue it, or --force to start over)")
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            for stale in (self.last, self.best, self.metrics, *self.numbered()):
                stale.unlink(missing_ok=True)
        except OSError as error:
            raise FsltoolError(f"{self.path}: cannot write the run folder ({error.strerror or error})") from None

    def numbered(self) -> list[Path]:
        """The numbered checkpoints (episode-N.pt, epoch-N.pt), oldest first."""
        return sorted((*self.checkpoints.glob("episode-*.pt"), *self.checkpoints.glob("epoch-*.pt")), key=numbered_count)

    def numbered_checkpoint(self, unit: str, count: int) -> Path:
        return self.checkpoints / f"{unit}-{count:08d}.pt"

    def prune(self, keep: int, keep_best: int = 0) -> None:
        """Delete the numbered checkpoints that are neither among the newest ``keep`` nor among the ``keep_best``
        best validated (``best_validated``); last.pt and best.pt are never touched."""
        numbered = self.numbered()
        kept = set(numbered[max(len(numbered) - keep, 0) :] if keep else [])
        kept.update(path for path, _ in self.best_validated(keep_best))
        for old in numbered:
            if old not in kept:
                old.unlink(missing_ok=True)

    def rows(self) -> list[dict[str, Any]]:
        """The metrics log's rows in order (none before the first is written). A log edited into something else
        is an error naming the file and line, not a traceback."""
        if not self.metrics.is_file():
            return []
        try:
            lines = self.metrics.read_text().splitlines()
        except OSError as error:
            raise FsltoolError(f"{self.metrics}: cannot read the run's metrics ({error.strerror or error})") from None
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise FsltoolError(f"{self.metrics}: line {number} is not a metrics row ({error})") from None
            if not isinstance(row, dict):
                raise FsltoolError(f"{self.metrics}: line {number} is not a metrics row (a JSON object)")
            rows.append(row)
        return rows

    def validation_scores(self) -> dict[int, float]:
        """Validation accuracy by count (episodes or epochs) from the metrics log: what each numbered checkpoint,
        written at a validation, scored."""
        return {row.get("episode", row.get("epoch")): row["accuracy"] for row in self.rows() if row.get("phase") == "val"}

    def best_validated(self, count: int) -> list[tuple[Path, float]]:
        """The ``count`` numbered checkpoints with the highest validation accuracy (the later one first on a tie),
        best first, with their accuracy: fewer where fewer were kept and scored."""
        if count < 1:
            return []  # no metrics log to read: prune calls this at every validation, mostly with 0
        scores = self.validation_scores()
        scored = [(path, scores[numbered_count(path)]) for path in self.numbered() if numbered_count(path) in scores]
        return sorted(scored, key=lambda item: (item[1], numbered_count(item[0])), reverse=True)[:count]

    def save_recipe(self, recipe: Recipe) -> None:
        """The resolved recipe (base merged, overrides applied) beside the run, as it is being trained."""
        self._replace(self.recipe, dump_recipe(recipe), "the resolved recipe")

    def truncate_metrics(self, unit: str, count: int, source: RunFolder | None = None) -> None:
        """Keep the log rows up to the checkpoint (``unit`` at most ``count``), so the log reads as one run: on
        resume, dropping those written after it; for a branch, the ``source`` run's rows up to the branch point."""
        rows = [row for row in (source or self).rows() if row.get(unit, 0) <= count]
        self._replace(self.metrics, "".join(json.dumps(row) + "\n" for row in rows), "the metrics log")

    def adopt_best(self, checkpoint: Path) -> None:
        """A branched run's best.pt: a copy of the source run's best checkpoint up to the branch point."""
        with open(checkpoint, "rb") as source:
            try:
                atomic_write(self.best, lambda file: shutil.copyfileobj(source, file))
            except OSError as error:
                raise write_error(self.best, "the best checkpoint", error) from None

    def log(self, row: dict[str, Any]) -> None:
        """Append one row; a write that fails (a full disk) is cut back off, so the log holds whole rows only."""
        data = (json.dumps(row) + "\n").encode()
        try:
            with open(self.metrics, "ab", buffering=0) as file:  # unbuffered: nothing left to fail again on close
                before = file.tell()
                try:
                    written = 0
                    while written < len(data):
                        written += file.write(data[written:])
                except OSError:
                    file.truncate(before)
                    raise
        except OSError as error:
            raise write_error(self.metrics, "the metrics log", error) from None

    @staticmethod
    def _replace(path: Path, text: str, what: str) -> None:
        try:
            atomic_write(path, lambda file: file.write(text.encode()))
        except OSError as error:
            raise write_error(path, what, error) from None


def numbered_count(checkpoint: Path) -> int:
    """The episode or epoch count in a numbered checkpoint's name (episode-00000125.pt: 125)."""
    return int(checkpoint.stem.split("-")[1])


def check_resumable(saved: dict[str, Any], recipe: Recipe, section: str, checkpoint: Path, recipe_file: Path) -> None:
    """Refuse to resume with a recipe that differs from the saved one in anything but ``section``'s resumable keys,
    the device and where the data is kept on it."""
    differences = _differences(_resumable(saved, section), _resumable(recipe.to_dict(), section))
    if differences:
        key, before, now = differences[0]
        allowed = ", ".join(f"{section}.{key}" for key in RESUMABLE_KEYS[section])
        raise FsltoolError(f"{checkpoint}: the recipe differs from the one this run was started with (see {recipe_file}): "
                           f"key {key!r} is {now!r} here but was {before!r}; "
                           f"only {allowed}, device and data_on_device may change on --resume")


# What a branch (``meta-train --branch-from``) may change besides the resumable keys: the learning-rate schedule,
# which is then checked step by step against the one that trained the checkpoint (fsltool.optim).
SCHEDULE_KEYS = ("lr_schedule", "lr_step", "lr_gamma", "lr_milestones", "lr_factors", "warmup")


def check_branchable(saved: dict[str, Any], recipe: Recipe, checkpoint: Path) -> None:
    """Refuse to branch from ``checkpoint`` with a recipe that trains differently from the one that wrote it in
    anything but the meta-training length and schedule, checkpoint keeping, the output folder, validation and the
    device; the first difference is named."""
    differences = _differences(_branchable(saved), _branchable(recipe.to_dict()))
    if differences:
        key, before, now = differences[0]
        raise FsltoolError(f"{checkpoint}: recipe key {key!r} is {now!r} here but {before!r} in the run that wrote this "
                           "checkpoint; a branch changes only train.episodes, the learning-rate schedule "
                           f"({', '.join('train.' + key for key in SCHEDULE_KEYS)}), validation, output and checkpoint keeping")


def _branchable(recipe: dict[str, Any]) -> dict[str, Any]:
    """A saved recipe, defaults filled in, minus the keys a branch may change."""
    full = _resumable(recipe, "train")
    for key in ("output", "validation", "test_shape"):
        full.pop(key)
    full["train"] = {key: value for key, value in full["train"].items() if key not in SCHEDULE_KEYS}
    return full


def _differences(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between two nested dicts, with both values (None where absent)."""
    found = []
    for key in sorted(before.keys() | now.keys()):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append((f"{prefix}{key}", a, b))
    return found


def _resumable(recipe: dict[str, Any], section: str) -> dict[str, Any]:
    """A saved recipe, defaults filled in, minus the keys a resumed run may change."""
    full = recipe_from_dict(recipe).to_dict()
    full.pop("device")
    full.pop("data_on_device")
    return {**full, section: {k: v for k, v in full[section].items() if k not in RESUMABLE_KEYS[section]}}


@dataclass
class Window:
    """Training statistics between two log rows; ``start`` counts optimizer steps (meta-training: episodes). The
    sums stay on the training device and are read once, for the row: not once per step."""

    start: int
    began: float
    sums: torch.Tensor | None = None  # (loss, right, classified) summed over the window's taken steps
    steps: int = 0
    data_wait: float = 0.0  # seconds the loop waited for its data (what prefetching hides)

    def add(self, totals: torch.Tensor) -> None:
        """A taken step's (global loss, queries or images right, queries or images classified)."""
        self.sums = totals if self.sums is None else self.sums + totals
        self.steps += 1

    def row(self, unit: str, count: int, now: float, lr: float, elapsed: float, skipped: int) -> dict[str, Any]:
        """A metrics row; loss and accuracy are null when every step of the window was skipped; data_wait_s is
        per step, ``{unit}s_per_s`` the speed."""
        loss, correct, total = self.sums.tolist() if self.sums is not None else (0.0, 0.0, 0.0)
        return {unit: count, "phase": "train",
                "loss": loss / self.steps if self.steps else None,
                "accuracy": 100 * correct / total if total else None,
                "lr": lr, f"{unit}s_per_s": (count - self.start) / (now - self.began), "elapsed": elapsed,
                "data_wait_s": self.data_wait / (count - self.start), "skipped_nonfinite": skipped}
