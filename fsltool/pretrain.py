"""Supervised pretraining: the backbone learns to classify every class of the training split in ordinary
mini-batches (Chen et al. 2019 "A Closer Look at Few-shot Classification"; Tian et al. 2020 "Rethinking Few-Shot
Image Classification"; Chen et al. 2021 "Meta-Baseline"), optionally with rotation prediction as an auxiliary
loss (Gidaris et al. 2019 "Boosting Few-Shot Visual Learning with Self-Supervision").

The run folder is a meta-training run's: the checkpoint's model is the recipe's few-shot method (ProtoNet unless
the recipe says otherwise) around the pretrained backbone, so `fsltool evaluate`, `export` and a meta-training
recipe's ``init:`` take a pretraining run as they take any other. Every ``validation.every`` epochs the method is
scored on the stored validation episodes, and the best checkpoint is the best few-shot accuracy, not the lowest
classification loss."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import Progress, TaskID, TextColumn
from torch import nn

from fsltool.checkpoint import save_checkpoint
from fsltool.console import console, progress_bar
from fsltool.data.augment import augment_images, episode_generator
from fsltool.data.batches import ImageBatches
from fsltool.data.store import open_for_run
from fsltool.distributed import Group, RunningStats
from fsltool.errors import FsltoolError, RunStopped
from fsltool.loop import PRETRAINING, StopRequest, autocast_for, open_run, run_in_group, shown, stop_requests
from fsltool.methods import Method
from fsltool.models.backbones import ramp_dropblocks, ramped_dropblocks
from fsltool.models.heads import build_head
from fsltool.optim import make_optimizer, trainable_parameters
from fsltool.recipe import PretrainConfig, Recipe
from fsltool.runs import Window
from fsltool.train import build_for_training, stored_shapes_needed

ROTATIONS = 4  # 0, 90, 180, 270 degrees


@dataclass
class PretrainResult:
    run_dir: Path
    epochs: int
    steps: int
    best_accuracy: float
    best_ci95: float
    best_epoch: int
    seconds: float
    skipped_nonfinite: int
    writer: bool


class Classifier(nn.Module):
    """The method's backbone with a classification head over the pretraining classes (and a 4-way rotation head
    when rotation prediction is on). Feature maps are averaged over space before the heads."""

    def __init__(self, method: Method, classes: int, config: PretrainConfig) -> None:
        super().__init__()
        self.method = method
        features = method.backbone.out_channels if len(method.backbone.embedding_shape) == 3 else method.backbone.embedding_size
        self.head = build_head(config.head, features, classes, config.head_scale)
        self.rotation_head = nn.Linear(features, ROTATIONS) if config.rotation_weight else None
        self.rotation_weight = config.rotation_weight

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        features = self.method.backbone(images)
        return features.mean((-2, -1)) if features.dim() == 4 else features

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the images and the number classified right. With rotation prediction the batch is run
        in all four rotations at once; the class loss is the upright images'."""
        if self.rotation_head is None:
            scores = self.head(self.embed(images))
            return F.cross_entropy(scores, labels), (scores.argmax(-1) == labels).sum()
        rotated = torch.cat([torch.rot90(images, k, (-2, -1)) for k in range(ROTATIONS)])
        embeddings = self.embed(rotated)
        scores = self.head(embeddings[: len(images)])
        angles = torch.arange(ROTATIONS, device=images.device).repeat_interleave(len(images))
        loss = F.cross_entropy(scores, labels) + self.rotation_weight * F.cross_entropy(self.rotation_head(embeddings), angles)
        return loss, (scores.argmax(-1) == labels).sum()

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The heads' parameters (the method's go to the checkpoint's ``model``, as for any run)."""
        return {name: module.state_dict() for name, module in self.named_children() if name != "method"}

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, module_state in state.items():
            getattr(self, name).load_state_dict(module_state)


def pretrain(recipe: Recipe, *, resume: bool = False, force: bool = False, quiet: bool = False) -> PretrainResult:
    """Pretrain ``recipe``'s backbone: in this process, or under torchrun as one of WORLD_SIZE data-parallel
    processes, each computing its share of every batch's ``pretrain.micro_batches`` (rank 0 writes and validates)."""
    if recipe.pretrain.epochs < 1:
        raise FsltoolError("recipe key 'pretrain.epochs' must be at least 1 for fsltool pretrain (the recipe's pretrain section)")
    return run_in_group(recipe, quiet, lambda group, device, quiet: _pretrain(recipe, group, device, resume=resume, force=force, quiet=quiet))


def _pretrain(recipe: Recipe, group: Group, device: torch.device, *, resume: bool, force: bool, quiet: bool) -> PretrainResult:
    return Pretraining(recipe, group, device, resume=resume, force=force).run(quiet)


class Pretraining:
    """One process's pretraining run: built from the recipe (data, method with its classification heads, optimizer
    and per-step schedule, run folder, or all of these taken back from the last checkpoint), then `run` trains
    epoch after epoch, logging, validating and checkpointing."""

    window: Window  # training statistics since the last log row

    def __init__(self, recipe: Recipe, group: Group, device: torch.device, *, resume: bool, force: bool) -> None:
        self.recipe, self.settings, self.group, self.device = recipe, recipe.pretrain, group, device
        settings = self.settings
        self.share = group.share(settings.micro_batches, "pretrain.micro_batches", "micro-batches")
        self.data = open_for_run(recipe.data, recipe.data_on_device, device)
        self.val_shape = stored_shapes_needed(recipe, self.data)
        self.batches = ImageBatches(self.data, self.data.classes_of(settings.splits), settings.batch_size, settings.micro_batches,
                                    self.share, recipe.seed, prefetch=settings.prefetch, device=device)
        if self.batches.steps_per_epoch < 1:
            raise FsltoolError(f"recipe key 'pretrain.batch_size': {settings.batch_size} is more than the "
                               f"{len(self.batches.indices)} images of {'+'.join(settings.splits)}")
        self.method, config = build_for_training(recipe, self.data, device, resume=resume)
        self.model = Classifier(self.method, self.batches.classes, settings).to(device)
        self.dropblocks = ramped_dropblocks(self.model)  # ramped up step by step (backbone_options.drop_ramp)
        parameters = trainable_parameters(self.model)
        self.per_epoch = per_epoch = self.batches.steps_per_epoch
        # The schedule runs per optimizer step; its epoch-counted keys are converted, so warm-up ramps within an epoch.
        in_steps = dataclasses.replace(settings, lr_step=settings.lr_step * per_epoch, warmup=settings.warmup * per_epoch,
                                       lr_milestones=[epoch * per_epoch for epoch in settings.lr_milestones])
        optimizer, self.scheduler = make_optimizer(in_steps, parameters, settings.epochs * per_epoch)

        self.run_folder, self.standing, state = open_run(recipe, PRETRAINING, group, self.method, config, optimizer, self.scheduler,
                                                         parameters, self.data, self.val_shape, resume=resume, force=force)
        self.validator, self.updater = self.standing.validator, self.standing.updater
        self.resumed_step = 0 if state is None else state["step"]  # the steps a resumed run had taken (perhaps mid-epoch)
        if state is not None:
            self.model.load_state(state["heads"])

    def checkpoint_at(self, epoch: int, step: int | None = None) -> Callable[[Path, float], None]:
        """A checkpoint after ``epoch`` whole epochs (validated where due) and ``step`` optimizer steps: the epochs'
        steps, or more where it falls within the next epoch."""
        def write(path: Path, elapsed: float) -> None:
            save_checkpoint(path, {**self.standing.snapshot(epoch, elapsed), "heads": self.model.state(),
                                   "step": epoch * self.per_epoch if step is None else step, "stage": "pretrain"})
        return write

    def save_last(self, epoch: int, step: int) -> None:
        """last.pt without validating: on time (``pretrain.checkpoint_minutes``) or at a stop signal."""
        self.validator.save_last(self.checkpoint_at(epoch, step), self.standing.elapsed())

    def stopped(self, number: int, epoch: int, step: int) -> RunStopped:
        """Save last.pt at ``step`` after a stop signal; the error that reports it."""
        self.save_last(epoch, step)
        run, where = self.run_folder, f"step {step} (epoch {step / self.per_epoch:.2f} of {self.settings.epochs})"
        return RunStopped(f"{signal.Signals(number).name} at {where}: saved {run.last}; continue with "
                          f"`fsltool pretrain {run.recipe} --resume`", number)

    def step(self, parts: list[tuple[torch.Tensor, torch.Tensor]], number: int) -> torch.Tensor | None:
        """One optimizer step over this process's micro-batches: its (global mean loss, images right, images) on the
        device, or None when it was skipped. Nothing is read back to the host here but the Updater's finiteness check."""
        settings = self.settings
        running_stats = RunningStats.of(self.model)
        ramp_dropblocks(self.dropblocks, number - 1)
        losses, correct, images_seen = [], torch.zeros((), device=self.device), 0
        for position, (images, labels) in zip(self.share, parts):
            if settings.augment.kind != "none":
                images = augment_images(images, settings.augment, episode_generator(self.recipe.seed, number, position))
            with autocast_for(self.recipe.precision, self.device, self.method):
                loss, right = self.model.loss(images, labels)
            losses.append(loss)
            correct = correct + right
            images_seen += len(labels)
        loss_tensor = torch.stack(losses).sum() / settings.micro_batches  # summed over processes: the batch mean
        totals = self.group.sum(torch.stack([loss_tensor.detach().double(), correct.double(),
                                             correct.new_full((), images_seen, dtype=torch.float64)]))
        taken = self.updater.apply(loss_tensor, totals[0], running_stats, f"step {number}")
        return totals if taken else None

    def log(self, number: int) -> dict[str, str]:
        """Close the statistics window with a metrics row; returns the progress bar's fields."""
        now = time.perf_counter()
        row = self.window.row("step", number, now, self.scheduler.get_last_lr()[0], self.standing.elapsed(), self.updater.skipped)
        row = {"epoch": number / self.per_epoch, **row, "images_per_s": row["steps_per_s"] * self.settings.batch_size}
        if self.group.writer:
            self.run_folder.log(row)
        self.window = Window(number, now)
        return {**shown(row), "speed": f"{row['images_per_s']:.0f}"}

    def validate(self, epoch: int) -> str:
        """Validate and checkpoint; validation time does not count against the training speed."""
        accuracy = self.validator(epoch, self.standing.elapsed, {"step": epoch * self.per_epoch}, self.checkpoint_at(epoch))
        self.model.train()
        self.window.began = time.perf_counter()
        return accuracy

    def train_epoch(self, epoch: int, progress: Progress, task: TaskID, stop: StopRequest) -> None:
        """The epoch's steps not yet taken, each logged every ``log_every`` steps and at the epoch's end; within the
        epoch, last.pt when it is due on time, and at a stop request (the epoch's end is the caller's)."""
        first = (epoch - 1) * self.per_epoch
        start = max(0, self.resumed_step - first)
        waiting = time.perf_counter()
        for index, parts in enumerate(self.batches.epoch(epoch, start), start):
            number = first + index + 1
            self.window.data_wait += time.perf_counter() - waiting
            totals = self.step(parts, number)
            if totals is not None:
                self.window.add(totals)
            self.scheduler.step()
            progress.update(task, completed=number)
            if number % self.settings.log_every == 0 or index + 1 == self.per_epoch:
                progress.update(task, **self.log(number))
            if index + 1 < self.per_epoch:
                if stop.signal is not None:
                    raise self.stopped(stop.signal, epoch - 1, number)
                if self.group.writer and self.validator.clock.due():
                    self.save_last(epoch - 1, number)
            waiting = time.perf_counter()

    def run(self, quiet: bool) -> PretrainResult:
        settings, per_epoch = self.settings, self.per_epoch
        self.model.train()
        self.standing.start_clock()
        self.window = Window(self.resumed_step, self.standing.began)
        columns = (TextColumn("epoch {task.fields[epoch]}"), TextColumn("loss {task.fields[loss]}"), TextColumn("acc {task.fields[acc]}"),
                   TextColumn("{task.fields[speed]} img/s"), TextColumn("val {task.fields[val]}"))
        with progress_bar(*columns, quiet=quiet) as progress, contextlib.closing(self.batches), \
                stop_requests(self.group.world == 1) as stop:
            task = progress.add_task("pretrain", total=settings.epochs * per_epoch, completed=self.resumed_step,
                                     epoch="-", loss="-", acc="-", speed="-", val="-")
            for epoch in range(self.standing.done + 1, settings.epochs + 1):
                progress.update(task, epoch=f"{epoch}/{settings.epochs}")
                self.train_epoch(epoch, progress, task, stop)
                if self.group.writer and (epoch % self.recipe.validation.every == 0 or epoch == settings.epochs):
                    progress.update(task, val=self.validate(epoch))
                elif self.group.writer and self.validator.clock.due():
                    self.save_last(epoch, epoch * per_epoch)
                if stop.signal is not None and epoch < settings.epochs:
                    raise self.stopped(stop.signal, epoch, epoch * per_epoch)
        seconds, best = self.standing.elapsed(), self.validator.best
        if self.group.writer and self.updater.skipped:
            console.print(f"skipped {self.updater.skipped} steps whose loss was not finite (pretrain.on_nonfinite=skip)")
        if not quiet:
            console.print(f"best validation accuracy {best['accuracy']:.2f} ± {best['ci95']:.2f}% ({self.val_shape}, {self.recipe.method}) "
                          f"at epoch {best['epoch']}")
        self.data.close()
        return PretrainResult(self.run_folder.path, settings.epochs, settings.epochs * per_epoch, best["accuracy"], best["ci95"],
                              best["epoch"], seconds, self.updater.skipped, self.group.writer)
