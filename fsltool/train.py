"""The meta-training loop: sample an episode, take a step, log, validate on stored episodes, checkpoint.
It knows nothing of the method it runs beyond the Method interface."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from rich.progress import TextColumn

from fsltool.checkpoint import (build_model, checkpoint_path, load_checkpoint, load_init_backbone, load_init_model, model_config,
                                save_checkpoint)
from fsltool.console import console, progress_bar
from fsltool.data.augment import augment_episode, check_augment_fits, episode_generator
from fsltool.data.batches import MetaBatches
from fsltool.data.episodes import Episode, EpisodeShape, TrainingShape
from fsltool.data.store import FewShotData, open_for_run
from fsltool.distributed import Group, RunningStats
from fsltool.errors import FsltoolError, RunStopped
from fsltool.loop import (META_TRAINING, BranchPoint, autocast_for, open_run, refuse_finished, run_in_group,
                           shown, stop_requests)
from fsltool.methods import Method
from fsltool.methods.base import StepOutput, TaskShare
from fsltool.models.backbones import ramp_dropblocks, ramped_dropblocks
from fsltool.models.weights import load_backbone_weights
from fsltool.optim import first_schedule_difference, make_optimizer, trainable_parameters
from fsltool.recipe import Recipe, recipe_from_dict
from fsltool.runs import Window, check_branchable


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


def meta_train(recipe: Recipe, *, resume: bool = False, force: bool = False, quiet: bool = False,
               branch_from: str | Path | None = None) -> TrainResult:
    """Meta-train ``recipe``: in this process, or, under torchrun, as one of WORLD_SIZE data-parallel processes
    (fsltool.distributed) of which rank 0 alone writes the run folder and validates. ``branch_from`` (a checkpoint,
    or a run folder for its last.pt) starts a new run from another run's checkpoint (`branch_point`)."""
    if resume and branch_from is not None:
        raise FsltoolError("--resume continues the run in the recipe's output folder and --branch-from starts a new one; give one")
    branch = branch_point(branch_from, recipe) if branch_from is not None else None
    return run_in_group(recipe, quiet, lambda group, device, quiet: MetaTraining(recipe, group, device, resume=resume, force=force,
                                                                                 branch=branch).run(quiet))


def branch_point(source: str | Path, recipe: Recipe) -> BranchPoint:
    """Another meta-training run's checkpoint, checked as a start for ``recipe``: the same training in every key
    but the length, the learning-rate schedule, validation, output and checkpoint keeping, and a schedule that gave
    the same learning rate at every step already taken. The branch then continues exactly as a run of ``recipe``
    started from scratch would have from that step (tested)."""
    checkpoint = checkpoint_path(source, "last")
    if Path(recipe.output).resolve() in checkpoint.resolve().parents:
        raise FsltoolError(f"{checkpoint}: a branch starts a new run folder, not {recipe.output} that holds its checkpoint; "
                           "give the branch another output")
    state = load_checkpoint(checkpoint)
    if state.get("stage") == "pretrain":
        raise FsltoolError(f"{checkpoint}: a pretraining checkpoint; a meta-training run starts from it with init: RUN")
    check_branchable(state["recipe"], recipe, checkpoint)
    done = state["episode"]
    refuse_finished(checkpoint, done, recipe.train.episodes, META_TRAINING)
    before = recipe_from_dict(state["recipe"]).train
    step = first_schedule_difference(before, before.episodes, recipe.train, recipe.train.episodes, done)
    if step is not None:
        raise FsltoolError(f"{checkpoint}: this recipe's learning-rate schedule gives episode {step + 1} another rate than the run "
                           f"that wrote the checkpoint did; a branch may change the schedule only after its {done} episodes")
    return BranchPoint(checkpoint, state)


def start_weights(method: Method, recipe: Recipe, image_shape: tuple[int, ...]) -> None:
    """A new run's starting weights: a run's (``init``: its feature layers, or with ``init_scope: model`` every
    layer of the method) or a weights file's (``backbone_options.weights``), if the recipe names one; never both.
    A resumed run takes everything from its checkpoint instead."""
    if recipe.init and "weights" in recipe.backbone_options:
        raise FsltoolError("recipe keys 'init' and 'backbone_options.weights' both name starting weights; keep one")
    if recipe.init and recipe.init_scope == "model":
        load_init_model(method, recipe, image_shape)
        return
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
        start_weights(method, recipe, data.image_shape)
    return method, config


class MetaTraining:
    """One process's meta-training run: built from the recipe (data, method, optimizer, sampler, run folder, or
    all of these taken back from the last checkpoint), then `run` steps, logs, validates and checkpoints until the
    recipe's last episode or a stop request."""

    window: Window  # training statistics since the last log row

    def __init__(self, recipe: Recipe, group: Group, device: torch.device, *, resume: bool, force: bool,
                 branch: BranchPoint | None = None) -> None:
        self.recipe, self.group, self.device = recipe, group, device
        self.share = group.share(recipe.train.meta_batch)
        self.data = open_for_run(recipe.data, recipe.data_on_device, device)
        self.val_shape = stored_shapes_needed(recipe, self.data)
        check_augment_fits(recipe.train.augment, self.data.image_shape, recipe.data)
        self.method, config = build_for_training(recipe, self.data, device, resume=resume or branch is not None)
        if not self.method.meta_trainable:
            raise FsltoolError(f"method {recipe.method!r} is not meta-trained: pretrain its backbone with `fsltool pretrain` "
                               "(recipe method: " + recipe.method + ") or meta-train protonet")
        self.task_share = TaskShare(self.share.start, recipe.train.meta_batch) if group.world > 1 else None  # for every meta_step
        self.dropblocks = ramped_dropblocks(self.method)  # ramped up update by update (backbone_options.drop_ramp)
        parameters = trainable_parameters(self.method)
        optimizer, self.scheduler = make_optimizer(recipe.train, parameters, recipe.train.episodes)
        generator = torch.Generator().manual_seed(recipe.seed + 1)
        shapes = TrainingShape.parse(recipe.train.shape)
        sampler = self.data.sampler(recipe.train.splits, shapes.largest, generator)

        self.run_folder, self.standing, state = open_run(recipe, META_TRAINING, group, self.method, config, optimizer, self.scheduler,
                                                         parameters, self.data, self.val_shape, resume=resume, force=force,
                                                         branch=branch)
        self.validator, self.updater = self.standing.validator, self.standing.updater
        if state is not None:
            generator.set_state(state["sampler_rng"])
        self.batches = MetaBatches(self.data, sampler, recipe.train.meta_batch, self.share, recipe.train.episodes - self.standing.done,
                                   prefetch=recipe.train.prefetch, device=device, shapes=shapes)

    def checkpoint_at(self, episode: int) -> Callable[[Path, float], None]:
        def write(path: Path, elapsed: float) -> None:
            save_checkpoint(path, {**self.standing.snapshot(episode, elapsed), "sampler_rng": self.batches.sampler_state()})
        return write

    def next_batch(self, episode: int) -> list[Episode]:
        batch = self.batches.next()
        augment = self.recipe.train.augment
        if augment.kind == "none":  # no per-episode generator is built when augmentation is off
            return batch
        return [augment_episode(task, augment, episode_generator(self.recipe.seed, episode, self.share.start + position))
                for position, task in enumerate(batch)]

    def meta_step(self, batch: list[Episode], episode: int) -> torch.Tensor | None:
        """One meta-update: its (global mean loss, queries right, queries) on the device, or None when it was skipped.
        Nothing is read back to the host here but the Updater's finiteness check."""
        running_stats = RunningStats.of(self.method)
        ramp_dropblocks(self.dropblocks, episode - 1)
        with autocast_for(self.recipe.precision, self.device, self.method):
            outputs: list[StepOutput] = self.method.meta_step(batch, self.task_share)
        # This process's losses over the GLOBAL meta-batch: summed over processes, the one-process mean.
        loss_tensor = torch.stack([output.loss for output in outputs]).sum() / self.recipe.train.meta_batch
        correct = torch.stack([(output.scores.argmax(-1) == (one.query_labels if output.labels is None else output.labels)).sum()
                               for output, one in zip(outputs, batch)]).sum()
        queries = sum(output.scores.shape[0] for output in outputs)
        totals = self.group.sum(torch.stack([loss_tensor.detach().double(), correct.double(),
                                             correct.new_full((), queries, dtype=torch.float64)]))
        taken = self.updater.apply(loss_tensor, totals[0], running_stats, f"episode {episode}")
        return totals if taken else None

    def train_through(self, episode: int) -> None:
        """Wait for the episode's batch and take its meta-step; the schedule follows the episode number, skipped
        meta-steps included."""
        waiting = time.perf_counter()
        batch = self.next_batch(episode)
        self.window.data_wait += time.perf_counter() - waiting
        totals = self.meta_step(batch, episode)
        if totals is not None:
            self.window.add(totals)
        self.scheduler.step()

    def log(self, episode: int) -> dict[str, str]:
        """Close the statistics window with a metrics row; returns the progress bar's fields."""
        now = time.perf_counter()
        row = self.window.row("episode", episode, now, self.scheduler.get_last_lr()[0],
                              self.standing.elapsed(), self.updater.skipped)
        if self.group.writer:
            self.run_folder.log(row)
        self.window = Window(episode, now)
        return {**shown(row), "speed": f"{row['episodes_per_s']:.1f}"}

    def validate(self, episode: int) -> str:
        """Validate and checkpoint; validation time does not count against the training speed."""
        accuracy = self.validator(episode, self.standing.elapsed, {}, self.checkpoint_at(episode))
        self.window.began = time.perf_counter()
        return accuracy

    def save_last(self, episode: int) -> None:
        """last.pt at ``episode``, without validating: on time (``train.checkpoint_minutes``) or at a stop signal."""
        self.validator.save_last(self.checkpoint_at(episode), self.standing.elapsed())

    def stopped(self, number: int, episode: int) -> RunStopped:
        """Save last.pt at ``episode`` after a stop signal; the error that reports it."""
        run = self.run_folder
        self.save_last(episode)
        return RunStopped(f"{signal.Signals(number).name} at episode {episode}: saved {run.last}; continue with "
                          f"`fsltool meta-train {run.recipe} --resume`", number)

    def run(self, quiet: bool) -> TrainResult:
        recipe, episodes = self.recipe, self.recipe.train.episodes
        self.method.train()
        self.standing.start_clock()
        self.window = Window(self.standing.done, self.standing.began)
        columns = (TextColumn("loss {task.fields[loss]}"), TextColumn("acc {task.fields[acc]}"),
                   TextColumn("{task.fields[speed]} ep/s"), TextColumn("val {task.fields[val]}"))
        with progress_bar(*columns, quiet=quiet) as progress, contextlib.closing(self.batches), \
                stop_requests(self.group.world == 1) as stop:
            task = progress.add_task("meta-train", total=episodes, completed=self.standing.done, loss="-", acc="-", speed="-", val="-")
            for episode in range(self.standing.done + 1, episodes + 1):
                self.train_through(episode)
                progress.update(task, completed=episode)
                if episode % recipe.train.log_every == 0 or episode == episodes:
                    progress.update(task, **self.log(episode))
                if self.group.writer and (episode % recipe.validation.every == 0 or episode == episodes):
                    progress.update(task, val=self.validate(episode))
                elif self.group.writer and self.validator.clock.due():
                    self.save_last(episode)
                if stop.signal is not None and episode < episodes:
                    raise self.stopped(stop.signal, episode)
        seconds, best = self.standing.elapsed(), self.validator.best
        if self.group.writer and self.updater.skipped:
            console.print(f"skipped {self.updater.skipped} meta-steps whose loss was not finite (train.on_nonfinite=skip)")
        if not quiet:
            console.print(f"best validation accuracy {best['accuracy']:.2f} ± {best['ci95']:.2f}% ({self.val_shape}) at episode {best['episode']}")
        self.data.close()
        return TrainResult(self.run_folder.path, episodes, best["accuracy"], best["ci95"], best["episode"], seconds,
                           self.updater.skipped, self.group.writer)
