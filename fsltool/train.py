"""The meta-training loop: sample an episode, take a step, log, validate on stored episodes, checkpoint.
It knows nothing of the method it runs beyond the Method interface."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from rich.progress import TextColumn

from fsltool.checkpoint import build_model, load_checkpoint, load_init_backbone, model_config, save_checkpoint, trained_on
from fsltool.console import console, progress_bar
from fsltool.data.augment import augment_episode, episode_generator
from fsltool.data.batches import MetaBatches
from fsltool.data.episodes import Episode, EpisodeShape
from fsltool.data.store import FewShotData, open_for_run
from fsltool.device import machine_description
from fsltool.distributed import Group, RunningStats
from fsltool.errors import FsltoolError
from fsltool.loop import Updater, Validator, autocast_for, run_in_group, stop_requests, stopped_run
from fsltool.methods import Method
from fsltool.methods.base import StepOutput, TaskShare
from fsltool.models.weights import load_backbone_weights
from fsltool.optim import make_optimizer, trainable_parameters
from fsltool.recipe import Recipe
from fsltool.runs import RunFolder, Window, check_resumable


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


def meta_train(recipe: Recipe, *, resume: bool = False, force: bool = False, quiet: bool = False) -> TrainResult:
    """Meta-train ``recipe``: in this process, or, under torchrun, as one of WORLD_SIZE data-parallel processes
    (fsltool.distributed) of which rank 0 alone writes the run folder and validates."""
    return run_in_group(recipe, quiet, lambda group, device, quiet: _meta_train(recipe, group, device, resume=resume, force=force, quiet=quiet))


def start_backbone(method: Method, recipe: Recipe, image_shape: tuple[int, ...]) -> None:
    """A new run's starting backbone: a run's (``init``) or a weights file's (``backbone_options.weights``), if
    the recipe names one; never both. A resumed run takes everything from its checkpoint instead."""
    if recipe.init and "weights" in recipe.backbone_options:
        raise FsltoolError("recipe keys 'init' and 'backbone_options.weights' both name starting weights; keep one")
    if recipe.init:
        load_init_backbone(method.backbone, recipe, image_shape)
    elif "weights" in recipe.backbone_options:
        load_backbone_weights(method.backbone, recipe.backbone, recipe.backbone_options["weights"])
    else:
        return
    method.backbone_loaded()


def stored_shapes_needed(recipe: Recipe, data: FewShotData) -> EpisodeShape:
    """Check, before any training, that ``data`` stores the validation episodes the run validates on and the test
    episodes of ``test_shape`` it will be evaluated on (as ``--check`` does): hours of training that end in a run
    `fsltool evaluate` refuses are worse than refusing now. Returns the validation shape."""
    val_shape = EpisodeShape.parse(recipe.validation.shape)
    data.stored_episodes("val", val_shape)
    data.stored_episodes("test", EpisodeShape.parse(recipe.test_shape))
    return val_shape


def build_for_training(recipe: Recipe, data: FewShotData, device: torch.device, *, resume: bool) -> tuple[Method, dict[str, Any]]:
    """The recipe's method on ``device``, initialised from the recipe seed and its starting weights, and the model
    configuration that rebuilds it."""
    torch.manual_seed(recipe.seed)
    config = model_config(recipe, data.image_shape, data.mean, data.std, data.provenance)
    method = build_model(config).to(device)
    if not resume:
        start_backbone(method, recipe, data.image_shape)
    return method, config


def _meta_train(recipe: Recipe, group: Group, device: torch.device, *, resume: bool, force: bool, quiet: bool) -> TrainResult:
    share = group.share(recipe.train.meta_batch)
    data = open_for_run(recipe.data, recipe.data_on_device, device)
    train_shape = EpisodeShape.parse(recipe.train.shape)
    val_shape = stored_shapes_needed(recipe, data)
    method, config = build_for_training(recipe, data, device, resume=resume)
    if not method.meta_trainable:
        raise FsltoolError(f"method {recipe.method!r} is not meta-trained: pretrain its backbone with `fsltool pretrain` "
                           "(recipe method: " + recipe.method + ") or meta-train protonet")
    task_share = TaskShare(share.start, recipe.train.meta_batch) if group.world > 1 else None  # handed to every meta_step
    parameters = trainable_parameters(method)
    optimizer, scheduler = make_optimizer(recipe.train, parameters, recipe.train.episodes)
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    sampler = data.sampler(recipe.train.splits, train_shape, generator)

    run = RunFolder(recipe.output)
    if group.writer:
        run.create(resume=resume, force=force)
    validator = Validator(method, data, val_shape, recipe.validation.episodes, run, recipe.train.keep_checkpoints, "episode",
                          recipe.precision)
    updater = Updater(optimizer, parameters, recipe.train, group, run.last)
    start, elapsed_before, machines = 0, 0.0, [machine_description(device, group.world)]
    if resume:
        state = load_checkpoint(run.last)
        check_resumable(state["recipe"], recipe, "train", run.last, run.recipe)
        if state["episode"] >= recipe.train.episodes:
            raise FsltoolError(f"{run.last}: already trained {state['episode']} episodes; raise train.episodes to continue")
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, validator.best, elapsed_before = state["episode"], state["best"], state["elapsed"]
        updater.skipped = state.get("skipped_nonfinite", 0)  # checkpoints written before the skip option have none
        machines = trained_on(state, machines[0])
        if group.writer:
            run.truncate_metrics("episode", start)
    if group.writer:
        run.save_recipe(recipe)
    batches = MetaBatches(data, sampler, recipe.train.meta_batch, share, recipe.train.episodes - start, prefetch=recipe.train.prefetch,
                          device=device)

    def checkpoint_at(episode: int) -> Callable[[Path, float], None]:
        def write(path: Path, elapsed: float) -> None:
            save_checkpoint(path, {
                "recipe": recipe.to_dict(), "model_config": config, "model": method.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler_rng": batches.sampler_state(), "torch_rng": torch.get_rng_state(),
                "episode": episode, "best": dict(validator.best), "elapsed": elapsed, "skipped_nonfinite": updater.skipped,
                "machines": machines,
            })
        return write

    def next_batch(episode: int) -> list[Episode]:
        batch = batches.next()
        if recipe.train.augment.kind == "none":  # no per-episode generator is built when augmentation is off
            return batch
        return [augment_episode(task, recipe.train.augment, episode_generator(recipe.seed, episode, share.start + position))
                for position, task in enumerate(batch)]

    def meta_step(batch: list[Episode], episode: int) -> torch.Tensor | None:
        """One meta-update: its (global mean loss, queries right, queries) on the device, or None when it was skipped.
        Nothing is read back to the host here but the Updater's finiteness check."""
        running_stats = RunningStats.of(method)
        with autocast_for(recipe.precision, device, method):
            outputs: list[StepOutput] = method.meta_step(batch, task_share)
        # This process's losses over the GLOBAL meta-batch: summed over processes, the one-process mean.
        loss_tensor = torch.stack([output.loss for output in outputs]).sum() / recipe.train.meta_batch
        correct = torch.stack([(output.scores.argmax(-1) == one.query_labels).sum() for output, one in zip(outputs, batch)]).sum()
        queries = sum(output.scores.shape[0] for output in outputs)
        totals = group.sum(torch.stack([loss_tensor.detach().double(), correct.double(), correct.new_full((), queries, dtype=torch.float64)]))
        taken = updater.apply(loss_tensor, totals[0], running_stats, f"episode {episode}")
        return totals if taken else None

    method.train()
    began = time.perf_counter()
    window = Window(start, began)
    columns = (TextColumn("loss {task.fields[loss]}"), TextColumn("acc {task.fields[acc]}"),
               TextColumn("{task.fields[speed]} ep/s"), TextColumn("val {task.fields[val]}"))
    with progress_bar(*columns, quiet=quiet) as progress, contextlib.closing(batches), stop_requests(group.world == 1) as stop:
        task = progress.add_task("meta-train", total=recipe.train.episodes, completed=start, loss="-", acc="-", speed="-", val="-")
        for episode in range(start + 1, recipe.train.episodes + 1):
            waiting = time.perf_counter()
            batch = next_batch(episode)
            window.data_wait += time.perf_counter() - waiting
            totals = meta_step(batch, episode)
            if totals is not None:
                window.add(totals)
            scheduler.step()  # the schedule follows the episode number, skipped meta-steps included
            progress.update(task, completed=episode)
            now = time.perf_counter()
            if episode % recipe.train.log_every == 0 or episode == recipe.train.episodes:
                row = window.row("episode", episode, now, scheduler.get_last_lr()[0], elapsed_before + now - began, updater.skipped)
                if group.writer:
                    run.log(row)
                progress.update(task, loss="-" if row["loss"] is None else f"{row['loss']:.3f}",
                                acc="-" if row["accuracy"] is None else f"{row['accuracy']:.1f}", speed=f"{row['episodes_per_s']:.1f}")
                window = Window(episode, now)
            if group.writer and (episode % recipe.validation.every == 0 or episode == recipe.train.episodes):
                shown = validator(episode, lambda: elapsed_before + time.perf_counter() - began, {}, checkpoint_at(episode))
                progress.update(task, val=shown)
                window.began = time.perf_counter()  # validation time does not count against training speed
            if stop.signal is not None and episode < recipe.train.episodes:
                checkpoint_at(episode)(run.last, elapsed_before + time.perf_counter() - began)
                raise stopped_run(stop.signal, "episode", episode, run, "meta-train")
    seconds = elapsed_before + time.perf_counter() - began
    best = validator.best
    if group.writer and updater.skipped:
        console.print(f"skipped {updater.skipped} meta-steps whose loss was not finite (train.on_nonfinite=skip)")
    if not quiet:
        console.print(f"best validation accuracy {best['accuracy']:.2f} ± {best['ci95']:.2f}% ({val_shape}) at episode {best['episode']}")
    data.close()
    return TrainResult(run.path, recipe.train.episodes, best["accuracy"], best["ci95"], best["episode"], seconds, updater.skipped, group.writer)
