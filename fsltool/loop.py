"""The parts every training loop shares (meta-training and pretraining): one optimizer update under the run's
non-finite policy, validation on stored episodes with best / last / numbered checkpoints, what a checkpoint holds
and how a resumed run takes it back, and stopping at a signal."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from fsltool import __version__
from fsltool.checkpoint import load_checkpoint, trained_on
from fsltool.console import console
from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.device import device_of, machine_description, prepare_device, resolve_device
from fsltool.distributed import Group, RunningStats, join
from fsltool.errors import FsltoolError
from fsltool.evaluate import evaluate
from fsltool.folder_lock import FolderLock
from fsltool.methods import Method
from fsltool.recipe import OptimConfig, Recipe, recipe_from_dict
from fsltool.runs import RunFolder, check_resumable


Result = TypeVar("Result")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """The signal (SIGINT or SIGTERM) that asked the training loop to stop, or None: the loop finishes its step,
    saves last.pt and stops, so that `--resume` continues from that step instead of the last validation."""

    signal: int | None = None


@contextlib.contextmanager
def stop_requests(enabled: bool) -> Iterator[StopRequest]:
    """While the loop runs, SIGINT and SIGTERM set a StopRequest instead of ending the process; a second signal
    meets the handler that was there before (Ctrl-C twice interrupts at once). Disabled (data-parallel processes,
    whose steps must stop together, or a thread other than the main one), the signals act as before."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def requested(number: int, frame: object) -> None:
        request.signal = number
        restore()

    for number in STOP_SIGNALS:
        signal.signal(number, requested)
    try:
        yield request
    finally:
        restore()


def run_in_group(recipe: Recipe, quiet: bool, loop: Callable[[Group, torch.device, bool], Result]) -> Result:
    """Run a training ``loop(group, device, quiet)`` on the recipe's device: in this process, or under torchrun as
    one of WORLD_SIZE data-parallel processes, of which the writer alone holds the run folder's lock (and prints);
    every process leaves the group, telling the others whether it finished."""
    device = resolve_device(recipe.device, "recipe key 'device'")
    prepare_device(device, repeating_shapes=True)  # one batch shape, step after step
    group = join(device)
    finished = False
    try:
        with FolderLock(recipe.output, "run folder") if group.writer else contextlib.nullcontext():
            result = loop(group, device, quiet or not group.writer)
        finished = True
        return result
    finally:
        group.leave(finished)


def autocast_for(precision: str, device: torch.device, training: Method | None = None) -> contextlib.AbstractContextManager[object]:
    """Where the recipe's ``precision`` is bf16, forward passes under torch.autocast: convolutions and matrix products
    in bfloat16, losses and reductions in fp32, while parameters, gradients and optimizer state stay fp32 (autocast
    casts copies). The training step of a method that differentiates through its inner gradients (MAML second
    order) stays fp32: second derivatives through bfloat16 products are too coarse to learn from."""
    second_order = getattr(training, "second_order_now", None)
    if precision == "fp32" or (second_order is not None and second_order()):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class Updater:
    """Applies one step's loss: backward, gradients summed over the processes, then, when the loss and every
    gradient are finite, clipping, the optimizer step and the BatchNorm statistics merge; otherwise it stops (the
    default) or skips the step and counts it. Deciding costs the step's one host-device synchronisation."""

    optimizer: torch.optim.Optimizer
    parameters: list[nn.Parameter]
    config: OptimConfig
    group: Group
    last_checkpoint: Path
    skipped: int = 0

    def apply(self, loss_tensor: torch.Tensor, global_loss: torch.Tensor, running_stats: RunningStats, where: str) -> bool:
        """``loss_tensor`` is this process's share, to backpropagate; ``global_loss`` the loss summed over the processes
        (a 0-dim tensor on the device). True when the step was taken. Every process sees the same summed loss and
        gradients, so all of them take or drop the step together."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_tensor.backward()
        self.group.sum_gradients(self.parameters)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters if p.grad is not None])
        if bool(torch.isfinite(global_loss + norm)):  # NaN or inf in the loss or in any gradient makes the sum non-finite
            if self.config.clip_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(self.parameters, self.config.clip_grad_norm, norm)
            if self.config.clip_grad_value:
                torch.nn.utils.clip_grad_value_(self.parameters, self.config.clip_grad_value)
            self.group.merge_running_stats(running_stats)
            self.optimizer.step()
            return True
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(global_loss)
        problem = f"loss is {loss}" if not math.isfinite(loss) else f"the gradient is not finite (loss {loss:.4g})"
        if self.config.on_nonfinite == "skip":
            running_stats.restore()  # the forward pass may have folded non-finite statistics in
            self.skipped += 1
            return False
        raise FsltoolError(f"{where}: {problem}; stopped (last good checkpoint: {self.last_checkpoint}; "
                           "on_nonfinite=skip drops such steps instead)")


@dataclass
class CheckpointClock:
    """When last.pt is due between validations: ``minutes`` of wall time after the last checkpoint (recipe key
    ``checkpoint_minutes``; 0: never), so that a process killed without warning (SIGKILL, out of memory, a machine
    taken back) loses at most about that much training. One clock read per step, no device synchronisation."""

    minutes: float
    since: float = field(default_factory=time.perf_counter)

    def due(self) -> bool:
        return self.minutes > 0 and time.perf_counter() - self.since >= 60 * self.minutes

    def restart(self) -> None:
        self.since = time.perf_counter()


@dataclass
class Validator:
    """Scores the method on the first stored validation episodes and writes the checkpoints: best.pt when the
    accuracy beats the best so far, last.pt always, and a numbered one when the recipe keeps them. Writing last.pt,
    here or between validations (`save_last`), restarts the ``clock`` that says when the next one is due."""

    method: Method
    data: FewShotData
    shape: EpisodeShape
    episodes: int
    run: RunFolder
    keep: int  # the newest numbered checkpoints kept
    keep_best: int  # and the best-validated ones
    unit: str  # what the numbered checkpoints count: episode | epoch
    precision: str = "fp32"  # the recipe's: validation runs as training does
    best: dict[str, Any] = field(default_factory=dict)  # accuracy, ci95 and the unit's count of the best so far
    clock: CheckpointClock = field(default_factory=lambda: CheckpointClock(0.0))  # the recipe's checkpoint_minutes

    def __post_init__(self) -> None:
        self.best = self.best or {"accuracy": -math.inf, "ci95": math.nan, self.unit: 0}

    def __call__(self, count: int, clock: Callable[[], float], extra: dict[str, Any], checkpoint: Callable[[Path, float], None]) -> str:
        """Validate at ``count`` (episodes or epochs), log the row (with ``extra`` keys and the run's ``clock()``
        seconds, this validation included) and checkpoint; returns the accuracy as the progress bar shows it."""
        with autocast_for(self.precision, device_of(self.method)):
            result = evaluate(self.method, self.data, "val", self.shape, episodes=self.episodes)
        elapsed = clock()
        self.run.log({self.unit: count, **extra, "phase": "val", "accuracy": result.accuracy, "ci95": result.ci95,
                      "shape": str(self.shape), "episodes": len(result.accuracies), "elapsed": elapsed})
        if result.accuracy > self.best["accuracy"]:
            self.best = {"accuracy": result.accuracy, "ci95": result.ci95, self.unit: count}
            checkpoint(self.run.best, elapsed)
        self.save_last(checkpoint, elapsed)
        if self.keep or self.keep_best:
            checkpoint(self.run.numbered_checkpoint(self.unit, count), elapsed)
            self.run.prune(self.keep, self.keep_best)
        return f"{result.accuracy:.2f}±{result.ci95:.2f}"

    def save_last(self, checkpoint: Callable[[Path, float], None], elapsed: float) -> None:
        """Write last.pt with ``checkpoint`` at ``elapsed`` training seconds; the next timed one is due from now."""
        checkpoint(self.run.last, elapsed)
        self.clock.restart()


@dataclass(frozen=True)
class BranchPoint:
    """Another run's checkpoint a new run starts from (``meta-train --branch-from``), loaded and checked."""

    checkpoint: Path
    state: dict[str, Any]


@dataclass
class Standing:
    """What every training loop checkpoints and a resumed run takes back alike (the method and the configuration
    that rebuilds it, optimizer, schedule, best validation, skipped steps, machines), and where the run stands:
    ``done`` steps of the validator's unit, after ``seconds_before`` of training by earlier processes."""

    recipe: Recipe
    config: dict[str, Any]
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    validator: Validator
    updater: Updater
    machine: str  # this process's (machine_description): the one that writes the checkpoints now
    machines: list[str] = field(init=False)  # every one the run has trained on, this one included
    done: int = 0
    seconds_before: float = 0.0
    origin: dict[str, Any] | None = None  # the checkpoint a branched run started from, and its count
    began: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.machines = [self.machine]  # a fresh run; _take_back adds this machine to a checkpoint's list

    def resume(self, run: RunFolder, kind: LoopKind, planned: int) -> dict[str, Any]:
        """Take back ``run``'s last checkpoint, refusing a changed recipe or a run already at its ``planned`` count;
        returns the checkpoint for the loop's own parts (sampler, heads)."""
        state = load_checkpoint(run.last)
        check_resumable(state["recipe"], self.recipe, kind.section, run.last, run.recipe)
        self._take_back(state, run.last, kind, planned)
        self.validator.best = state["best"]
        self.origin = state.get("branched_from")
        if self.updater.group.writer:
            run.truncate_metrics(kind.log_key, state[kind.log_key])
            note_other_rounding(state, self.machine)
        return state

    def branch(self, point: BranchPoint, run: RunFolder, kind: LoopKind, planned: int) -> dict[str, Any]:
        """Start the new ``run`` from another run's checkpoint (checked by the caller as branchable): as a resume,
        except that the learning rate follows this recipe's schedule from the checkpoint on. The log starts with the
        source's history; the best validation is carried over where its checkpoint can be, and otherwise best.pt is
        chosen among the branch's own validations."""
        source, state = point.checkpoint, point.state
        self._take_back(state, source, kind, planned)
        factor = self.scheduler.lr_lambdas[0]  # this recipe's schedule: the saved state holds the step, not the function
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor(self.done)
        unit = self.validator.unit
        self.origin = {"checkpoint": str(source), unit: self.done}
        # A checkpoint outside a run folder's checkpoints/ has no history or other checkpoints to carry.
        source_run = RunFolder(source.parent.parent) if source.parent.name == "checkpoints" else None
        same_validation = recipe_from_dict(state["recipe"]).validation == self.recipe.validation
        best = carried_best(source, state, source_run, unit) if same_validation and source_run else None
        if best is not None:
            self.validator.best = state["best"]
        if self.updater.group.writer:
            if best is not None:
                run.adopt_best(best)
            if source_run is not None:
                run.truncate_metrics(unit, self.done, source=source_run)
        return state

    def _take_back(self, state: dict[str, Any], checkpoint: Path, kind: LoopKind, planned: int) -> None:
        """What resuming and branching take from a checkpoint: weights, optimizer and schedule state, random state,
        skipped steps, where the run stands and the machines it was trained on."""
        unit = self.validator.unit
        refuse_finished(checkpoint, state[unit], planned, kind)
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.updater.skipped = state.get("skipped_nonfinite", 0)  # checkpoints written before the skip option have none
        self.done, self.seconds_before = state[unit], state["elapsed"]
        self.machines = trained_on(state, self.machine)

    def snapshot(self, count: int, elapsed: float) -> dict[str, Any]:
        """The checkpoint's common part at ``count`` steps of the unit and ``elapsed`` training seconds."""
        return {"recipe": self.recipe.to_dict(), "model_config": self.config, "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), self.validator.unit: count, "best": dict(self.validator.best),
                "elapsed": elapsed, "skipped_nonfinite": self.updater.skipped, "machines": self.machines,
                "written_on": self.machine,
                **({"branched_from": self.origin} if self.origin else {})}

    def start_clock(self) -> None:
        self.began = time.perf_counter()

    def elapsed(self) -> float:
        """Training seconds of the whole run, earlier processes included."""
        return self.seconds_before + time.perf_counter() - self.began


@dataclass(frozen=True)
class LoopKind:
    """What a training loop counts and where its recipe settings live: the recipe ``section`` (train, pretrain),
    the ``unit`` its checkpoints and validations count (``<section>.<unit>s`` is the planned count), the ``verb``
    that says a finished run's count, and the ``log_key`` that counts its optimizer steps in the metrics log and in a
    checkpoint (a checkpoint may fall between two validations: a resumed run's log is cut back at that step)."""

    section: str
    unit: str
    verb: str
    log_key: str


META_TRAINING = LoopKind("train", "episode", "trained", "episode")
PRETRAINING = LoopKind("pretrain", "epoch", "pretrained", "step")


def note_other_rounding(state: dict[str, Any], here: str) -> None:
    """Say so when a run resumes where its steps will round differently from those before: on another kind of
    machine than the one that wrote its checkpoint (other kernels), or under another fsltool version (a release may
    compute a step another way: CHANGELOG.md). Either way it continues exactly from that checkpoint. (Checkpoints
    before fsltool 0.6 do not say which machine wrote them: the last one their list added stands in.)"""
    writer = state.get("written_on") or (state.get("machines") or [here])[-1]
    if writer != here:
        console.print(f"note: resuming on {here}; the checkpoint was written on {writer}: training continues "
                      "exactly from it, but with this machine's rounding, so the run is no longer bit for bit what "
                      "one machine would give", highlight=False, soft_wrap=True)
    version = state.get("fsltool_version")
    if version is not None and version != __version__:
        console.print(f"note: resuming with fsltool {__version__}; the checkpoint was written by fsltool {version}: "
                      "training continues exactly from it, but a release may compute a step another way (CHANGELOG.md), "
                      "so the run is no longer bit for bit what one version would give", highlight=False, soft_wrap=True)


def refuse_finished(checkpoint: Path, done: int, planned: int, kind: LoopKind) -> None:
    """A checkpoint already at the recipe's ``planned`` count has nothing left to resume or branch into."""
    if done >= planned:
        raise FsltoolError(f"{checkpoint}: already {kind.verb} {done} {kind.unit}s; raise {kind.section}.{kind.unit}s to continue")


def carried_best(source: Path, state: dict[str, Any], source_run: RunFolder, unit: str) -> Path | None:
    """The checkpoint of the best validation up to the branch point ``state`` (loaded from ``source``): the source
    itself, the source run's numbered checkpoint of that count, or its best.pt if that is still the one; None when
    none of these is (the numbered one pruned and best.pt overwritten by a later validation)."""
    count = state["best"][unit]
    if count == state[unit]:
        return source
    numbered = source_run.numbered_checkpoint(unit, count)
    if numbered.is_file():
        return numbered
    if source_run.best.is_file() and load_checkpoint(source_run.best, mmap=True)[unit] == count:
        return source_run.best
    return None


def open_run(recipe: Recipe, kind: LoopKind, group: Group, method: Method, config: dict[str, Any],
             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, parameters: list[nn.Parameter],
             data: FewShotData, val_shape: EpisodeShape, *, resume: bool, force: bool,
             branch: BranchPoint | None = None) -> tuple[RunFolder, Standing, dict[str, Any] | None]:
    """Open the recipe's run folder for a loop of ``kind``, new, resumed or branched from another run's checkpoint:
    the folder (created by the writing process), the loop's Standing (with its Validator and Updater), and, when
    resuming or branching, the checkpoint for the loop's own parts. The recipe is saved once a resumed run has been
    checked against it."""
    settings = getattr(recipe, kind.section)
    run = RunFolder(recipe.output)
    if group.writer:
        run.create(resume=resume, force=force)
    validator = Validator(method, data, val_shape, recipe.validation.episodes, run, settings.keep_checkpoints,
                          settings.keep_best_checkpoints, kind.unit, recipe.precision,
                          clock=CheckpointClock(settings.checkpoint_minutes))
    updater = Updater(optimizer, parameters, settings, group, run.last)
    here = machine_description(device_of(method), group.world)
    standing = Standing(recipe, config, method, optimizer, scheduler, validator, updater, here)
    planned = getattr(settings, f"{kind.unit}s")
    if resume:
        state = standing.resume(run, kind, planned)
    elif branch is not None:
        state = standing.branch(branch, run, kind, planned)
    else:
        state = None
    if group.writer:
        run.save_recipe(recipe)
    return run, standing, state


def shown(row: dict[str, Any]) -> dict[str, str]:
    """A training row's loss and accuracy as the progress bar shows them ("-" when every step was skipped)."""
    return {"loss": "-" if row["loss"] is None else f"{row['loss']:.3f}",
            "acc": "-" if row["accuracy"] is None else f"{row['accuracy']:.1f}"}
