"""The meta-training loop: sample an episode, take a step, log, validate on stored episodes, checkpoint.
It knows nothing of the method it runs beyond the Method interface."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from rich.progress import TextColumn

from fsltool.checkpoint import build_model, load_checkpoint, model_config, save_checkpoint
from fsltool.console import console, progress_bar
from fsltool.data.augment import augment_episode, episode_generator
from fsltool.data.batches import MetaBatches
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.device import resolve_device
from fsltool.distributed import Group, RunningStats, join
from fsltool.errors import FsltoolError
from fsltool.evaluate import evaluate
from fsltool.methods import Method
from fsltool.methods.base import TaskShare
from fsltool.models.weights import load_backbone_weights
from fsltool.recipe import RESUMABLE_KEYS, Recipe, TrainConfig, dump_recipe, recipe_from_dict


@dataclass
class TrainResult:
    run_dir: Path
    episodes: int
    best_accuracy: float
    best_ci95: float
    best_episode: int
    seconds: float
    skipped_nonfinite: int  # meta-steps dropped for a non-finite loss (train.on_nonfinite=skip)
    writer: bool  # this process wrote the run folder (the only one that has validation results under torchrun)


def trainable_parameters(method: Method) -> list[torch.nn.Parameter]:
    """The parameters training updates: all but those a frozen backbone stage keeps fixed."""
    return [parameter for parameter in method.parameters() if parameter.requires_grad]


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, train: torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay),
    "adamw": lambda params, train: torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay),
    "sgd": lambda params, train: torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay),
}


def lr_factor(train: TrainConfig) -> Callable[[int], float]:
    """The learning rate's multiplier after ``done`` meta-steps: the warm-up ramp times the schedule.

    ``linear`` is Reptile's annealing (Nichol et al.): meta-step i of E (0-based) uses lr * (1 - i / E), reaching 0
    after the last; ``cosine`` follows half a cosine from lr to 0 over E. Both follow the recipe's
    ``train.episodes``: a run resumed with the same value continues the schedule exactly; one resumed with more
    episodes continues on the longer curve from where it stands, as if it had been planned that long."""
    episodes, warmup = train.episodes, train.warmup
    schedules: dict[str, Callable[[int], float]] = {
        "step": lambda done: train.lr_gamma ** (done // train.lr_step) if train.lr_step else 1.0,
        "linear": lambda done: max(0.0, 1 - done / episodes),
        "cosine": lambda done: 0.5 * (1 + math.cos(math.pi * min(done, episodes) / episodes)),
    }
    schedule = schedules[train.lr_schedule]
    return lambda done: (min(1.0, (done + 1) / warmup) if warmup else 1.0) * schedule(done)


def make_optimizer(recipe: Recipe, method: Method) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The outer optimizer and its schedule (``lr_factor``), stepped once per episode (meta-step)."""
    optimizer = OPTIMIZERS[recipe.train.optimizer](trainable_parameters(method), recipe.train)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe.train))


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
        """The episode-numbered checkpoints, oldest first."""
        return sorted(self.checkpoints.glob("episode-*.pt"), key=lambda path: int(path.stem.split("-")[1]))

    def episode_checkpoint(self, episode: int) -> Path:
        return self.checkpoints / f"episode-{episode:08d}.pt"

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` numbered checkpoints (last.pt and best.pt are never touched)."""
        numbered = self.numbered()
        for old in numbered[: max(len(numbered) - keep, 0)]:
            old.unlink(missing_ok=True)

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




def _resumable(recipe: dict[str, Any]) -> dict[str, Any]:
    """A saved recipe, defaults filled in, minus the keys a resumed run may change (RESUMABLE_KEYS, and the device)."""
    full = recipe_from_dict(recipe).to_dict()
    full.pop("device")
    return {**full, "train": {k: v for k, v in full["train"].items() if k not in RESUMABLE_KEYS}}


@dataclass
class Window:
    """Training statistics between two log rows."""

    start: int
    began: float
    loss: float = 0.0
    correct: float = 0.0
    total: float = 0.0
    steps: int = 0
    data_wait: float = 0.0  # seconds the loop waited for its episodes (what prefetching hides)

    def row(self, episode: int, now: float, lr: float, elapsed: float, skipped: int) -> dict[str, Any]:
        """A metrics row; loss and accuracy are null when every meta-step of the window was skipped; data_wait_s is
        per meta-step."""
        return {"episode": episode, "phase": "train",
                "loss": self.loss / self.steps if self.steps else None,
                "accuracy": 100 * self.correct / self.total if self.total else None,
                "lr": lr, "episodes_per_s": (episode - self.start) / (now - self.began), "elapsed": elapsed,
                "data_wait_s": self.data_wait / (episode - self.start), "skipped_nonfinite": skipped}


def meta_train(recipe: Recipe, *, resume: bool = False, force: bool = False, quiet: bool = False) -> TrainResult:
    """Meta-train ``recipe``: in this process, or, under torchrun, as one of WORLD_SIZE data-parallel processes
    (fsltool.distributed) of which rank 0 alone writes the run folder and validates."""
    device = resolve_device(recipe.device, "recipe key 'device'")
    group = join(device)
    try:
        return _meta_train(recipe, group, device, resume=resume, force=force, quiet=quiet or not group.writer)
    finally:
        group.leave()


def _meta_train(recipe: Recipe, group: Group, device: torch.device, *, resume: bool, force: bool, quiet: bool) -> TrainResult:
    share = group.share(recipe.train.meta_batch)
    data = FewShotData(recipe.data)
    train_shape = EpisodeShape.parse(recipe.train.shape)
    val_shape = EpisodeShape.parse(recipe.validation.shape)
    data.stored_episodes("val", val_shape)  # fail now, not after the first block of training
    torch.manual_seed(recipe.seed)
    config = model_config(recipe, data.image_shape, data.mean, data.std, data.provenance)
    method = build_model(config).to(device)
    if group.world > 1:
        method.task_share = TaskShare(share.start, recipe.train.meta_batch)
    if not resume and "weights" in recipe.backbone_options:
        load_backbone_weights(method.backbone, recipe.backbone, recipe.backbone_options["weights"])
    optimizer, scheduler = make_optimizer(recipe, method)
    parameters = trainable_parameters(method)
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    sampler = data.sampler("train", train_shape, generator)

    run = RunFolder(recipe.output)
    if group.writer:
        run.create(resume=resume, force=force)
    start, best = 0, {"accuracy": -math.inf, "ci95": math.nan, "episode": 0}
    elapsed_before, skipped = 0.0, 0
    if resume:
        state = load_checkpoint(run.last)
        if _resumable(state["recipe"]) != _resumable(recipe.to_dict()):
            raise FsltoolError(f"{run.last}: the recipe differs from the one this run was started with (see {run.recipe}); "
                               f"only {', '.join('train.' + key for key in RESUMABLE_KEYS)} and device may change on --resume")
        if state["episode"] >= recipe.train.episodes:
            raise FsltoolError(f"{run.last}: already trained {state['episode']} episodes; raise train.episodes to continue")
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, best, elapsed_before = state["episode"], state["best"], state["elapsed"]
        skipped = state.get("skipped_nonfinite", 0)  # checkpoints written before the skip option have none
        if group.writer:
            run.truncate_metrics(start)
    if group.writer:
        run.save_recipe(recipe)
    batches = MetaBatches(data, sampler, recipe.train.meta_batch, share, recipe.train.episodes - start, prefetch=recipe.train.prefetch)

    def checkpoint(path: Path, episode: int, elapsed: float) -> None:
        save_checkpoint(
            path,
            {
                "recipe": recipe.to_dict(),
                "model_config": config,
                "model": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler_rng": batches.sampler_state(),
                "torch_rng": torch.get_rng_state(),
                "episode": episode,
                "best": dict(best),
                "elapsed": elapsed,
                "skipped_nonfinite": skipped,
            },
        )

    augmenting = recipe.train.augment.kind != "none"
    method.train()
    began = time.perf_counter()
    window = Window(start, began)
    columns = (TextColumn("loss {task.fields[loss]}"), TextColumn("acc {task.fields[acc]}"),
               TextColumn("{task.fields[speed]} ep/s"), TextColumn("val {task.fields[val]}"))
    with progress_bar(*columns, quiet=quiet) as progress, contextlib.closing(batches):
        task = progress.add_task("meta-train", total=recipe.train.episodes, completed=start, loss="-", acc="-", speed="-", val="-")
        for episode in range(start + 1, recipe.train.episodes + 1):
            waiting = time.perf_counter()
            batch = [task.to(device) for task in batches.next()]
            if augmenting:  # no per-episode generator is built when augmentation is off
                batch = [augment_episode(task, recipe.train.augment, episode_generator(recipe.seed, episode, share.start + position))
                         for position, task in enumerate(batch)]
            window.data_wait += time.perf_counter() - waiting
            running_stats = RunningStats.of(method)
            outputs = method.meta_step(batch)
            # This process's losses over the GLOBAL meta-batch: summed over processes, the one-process mean.
            loss_tensor = torch.stack([output.loss for output in outputs]).sum() / recipe.train.meta_batch
            correct = sum((output.scores.argmax(-1) == one.query_labels).sum().item() for output, one in zip(outputs, batch))
            totals = group.sum(torch.tensor([loss_tensor.item(), correct, sum(output.scores.shape[0] for output in outputs)],
                                            dtype=torch.float64, device=device))
            loss = float(totals[0])
            if math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                loss_tensor.backward()
                group.sum_gradients(parameters)
                if recipe.train.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(parameters, recipe.train.clip_grad_norm)
                group.merge_running_stats(running_stats)
                optimizer.step()
                window.loss, window.correct, window.total, window.steps = (
                    window.loss + loss, window.correct + float(totals[1]), window.total + float(totals[2]), window.steps + 1)
            elif recipe.train.on_nonfinite == "skip":
                running_stats.restore()  # the forward pass may have folded non-finite statistics in
                skipped += 1
            else:
                raise FsltoolError(f"episode {episode}: loss is {loss}; stopped (last good checkpoint: {run.last}; "
                                   "train.on_nonfinite=skip drops such meta-steps instead)")
            scheduler.step()  # the schedule follows the episode number, skipped meta-steps included
            progress.update(task, completed=episode)
            now = time.perf_counter()
            if episode % recipe.train.log_every == 0 or episode == recipe.train.episodes:
                row = window.row(episode, now, scheduler.get_last_lr()[0], elapsed_before + now - began, skipped)
                if group.writer:
                    run.log(row)
                progress.update(task, loss="-" if row["loss"] is None else f"{row['loss']:.3f}",
                                acc="-" if row["accuracy"] is None else f"{row['accuracy']:.1f}", speed=f"{row['episodes_per_s']:.1f}")
                window = Window(episode, now)
            if group.writer and (episode % recipe.validation.every == 0 or episode == recipe.train.episodes):
                result = evaluate(method, data, "val", val_shape, episodes=recipe.validation.episodes)
                elapsed = elapsed_before + time.perf_counter() - began
                run.log({"episode": episode, "phase": "val", "accuracy": result.accuracy, "ci95": result.ci95,
                         "shape": str(val_shape), "episodes": len(result.accuracies), "elapsed": elapsed})
                progress.update(task, val=f"{result.accuracy:.2f}±{result.ci95:.2f}")
                if result.accuracy > best["accuracy"]:
                    best = {"accuracy": result.accuracy, "ci95": result.ci95, "episode": episode}
                    checkpoint(run.best, episode, elapsed)
                checkpoint(run.last, episode, elapsed)
                if recipe.train.keep_checkpoints:
                    checkpoint(run.episode_checkpoint(episode), episode, elapsed)
                    run.prune(recipe.train.keep_checkpoints)
                window.began = time.perf_counter()  # validation time does not count against training speed
    seconds = elapsed_before + time.perf_counter() - began
    if group.writer and skipped:
        console.print(f"skipped {skipped} meta-steps whose loss was not finite (train.on_nonfinite=skip)")
    if not quiet:
        console.print(f"best validation accuracy {best['accuracy']:.2f} ± {best['ci95']:.2f}% ({val_shape}) at episode {best['episode']}")
    data.close()
    return TrainResult(run.path, recipe.train.episodes, best["accuracy"], best["ci95"], best["episode"], seconds, skipped, group.writer)
