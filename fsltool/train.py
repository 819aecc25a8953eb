"""The meta-training loop: sample an episode, take a step, log, validate on stored episodes, checkpoint.
It knows nothing of the method it runs beyond the Method interface."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import TextColumn

from fsltool.checkpoint import build_model, load_checkpoint, model_config, save_checkpoint
from fsltool.console import console, progress_bar
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.errors import FsltoolError
from fsltool.evaluate import evaluate
from fsltool.methods import Method
from fsltool.recipe import Recipe, dump_recipe


@dataclass
class TrainResult:
    run_dir: Path
    episodes: int
    best_accuracy: float
    best_ci95: float
    best_episode: int
    seconds: float


def make_optimizer(recipe: Recipe, method: Method) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    train = recipe.train
    if train.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(method.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.SGD(method.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.lr_step == 0:  # constant learning rate
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=1.0)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.lr_step, gamma=train.lr_gamma)


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
            for stale in (self.last, self.best, self.metrics):
                stale.unlink(missing_ok=True)
        except OSError as error:
            raise FsltoolError(f"{self.path}: cannot write the run folder ({error.strerror or error})") from None

    def save_recipe(self, recipe: Recipe) -> None:
        """The resolved recipe (base merged, overrides applied) beside the run, as it is being trained."""
        self.recipe.write_text(dump_recipe(recipe))

    def truncate_metrics(self, episode: int) -> None:
        """On resume, drop log rows written after the checkpoint, so the log reads as one uninterrupted run."""
        if not self.metrics.is_file():
            return
        rows = [line for line in self.metrics.read_text().splitlines() if line.strip() and json.loads(line)["episode"] <= episode]
        self.metrics.write_text("".join(row + "\n" for row in rows))

    def log(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a") as file:
            file.write(json.dumps(row) + "\n")


def _without_length(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe minus train.episodes: a resumed run may be extended, nothing else may change."""
    return {**recipe, "train": {k: v for k, v in recipe["train"].items() if k != "episodes"}}


def meta_train(recipe: Recipe, *, resume: bool = False, force: bool = False, quiet: bool = False) -> TrainResult:
    data = FewShotData(recipe.data)
    train_shape = EpisodeShape.parse(recipe.train.shape)
    val_shape = EpisodeShape.parse(recipe.validation.shape)
    data.stored_episodes("val", val_shape)  # fail now, not after the first block of training
    torch.manual_seed(recipe.seed)
    config = model_config(recipe, data.image_shape, data.mean, data.std, data.provenance)
    method = build_model(config)
    optimizer, scheduler = make_optimizer(recipe, method)
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    sampler = data.sampler("train", train_shape, generator)

    run = RunFolder(recipe.output)
    run.create(resume=resume, force=force)
    start, best = 0, {"accuracy": -math.inf, "ci95": math.nan, "episode": 0}
    elapsed_before = 0.0
    if resume:
        state = load_checkpoint(run.last)
        if _without_length(state["recipe"]) != _without_length(recipe.to_dict()):
            raise FsltoolError(f"{run.last}: the recipe differs from the one this run was started with (see {run.recipe}); "
                               "only train.episodes may change on --resume")
        if state["episode"] >= recipe.train.episodes:
            raise FsltoolError(f"{run.last}: already trained {state['episode']} episodes; raise train.episodes to continue")
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, best, elapsed_before = state["episode"], state["best"], state["elapsed"]
        run.truncate_metrics(start)
    run.save_recipe(recipe)

    def checkpoint(path: Path, episode: int, elapsed: float) -> None:
        save_checkpoint(
            path,
            {
                "recipe": recipe.to_dict(),
                "model_config": config,
                "model": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler_rng": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "episode": episode,
                "best": dict(best),
                "elapsed": elapsed,
            },
        )

    method.train()
    began = time.perf_counter()
    window_loss = window_correct = window_total = 0.0
    window_start, window_time = start, began
    columns = (TextColumn("loss {task.fields[loss]}"), TextColumn("acc {task.fields[acc]}"),
               TextColumn("{task.fields[speed]} ep/s"), TextColumn("val {task.fields[val]}"))
    with progress_bar(*columns, quiet=quiet) as progress:
        task = progress.add_task("meta-train", total=recipe.train.episodes, completed=start, loss="-", acc="-", speed="-", val="-")
        for episode in range(start + 1, recipe.train.episodes + 1):
            batch = [data.episode(*sampler.sample(), train_shape) for _ in range(recipe.train.meta_batch)]
            outputs = method.meta_step(batch)
            loss_tensor = torch.stack([output.loss for output in outputs]).mean()
            loss = loss_tensor.item()
            if not math.isfinite(loss):
                raise FsltoolError(f"episode {episode}: loss is {loss}; stopped (last good checkpoint: {run.last})")
            optimizer.zero_grad(set_to_none=True)
            loss_tensor.backward()
            optimizer.step()
            scheduler.step()
            window_loss += loss
            for output, one in zip(outputs, batch):
                window_correct += (output.scores.argmax(-1) == one.query_labels).sum().item()
                window_total += output.scores.shape[0]
            progress.update(task, completed=episode)
            now = time.perf_counter()
            if episode % recipe.train.log_every == 0 or episode == recipe.train.episodes:
                n = episode - window_start
                row = {"episode": episode, "phase": "train", "loss": window_loss / n, "accuracy": 100 * window_correct / window_total,
                       "lr": scheduler.get_last_lr()[0], "episodes_per_s": n / (now - window_time), "elapsed": elapsed_before + now - began}
                run.log(row)
                progress.update(task, loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.1f}", speed=f"{row['episodes_per_s']:.1f}")
                window_loss = window_correct = window_total = 0.0
                window_start, window_time = episode, now
            if episode % recipe.validation.every == 0 or episode == recipe.train.episodes:
                result = evaluate(method, data, "val", val_shape, episodes=recipe.validation.episodes)
                elapsed = elapsed_before + time.perf_counter() - began
                run.log({"episode": episode, "phase": "val", "accuracy": result.accuracy, "ci95": result.ci95,
                         "shape": str(val_shape), "episodes": len(result.accuracies), "elapsed": elapsed})
                progress.update(task, val=f"{result.accuracy:.2f}±{result.ci95:.2f}")
                if result.accuracy > best["accuracy"]:
                    best = {"accuracy": result.accuracy, "ci95": result.ci95, "episode": episode}
                    checkpoint(run.best, episode, elapsed)
                checkpoint(run.last, episode, elapsed)
                window_time = time.perf_counter()  # validation time does not count against training speed
    seconds = elapsed_before + time.perf_counter() - began
    if not quiet:
        console.print(f"best validation accuracy {best['accuracy']:.2f} ± {best['ci95']:.2f}% ({val_shape}) at episode {best['episode']}")
    data.close()
    return TrainResult(run.path, recipe.train.episodes, best["accuracy"], best["ci95"], best["episode"], seconds)
