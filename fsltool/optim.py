"""Optimisers and learning-rate schedules from a recipe's optimisation keys (``train`` or ``pretrain``), shared by
meta-training and pretraining so both resume and schedule the same way."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch
from torch import nn

from fsltool.recipe import OptimConfig

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], OptimConfig], torch.optim.Optimizer]] = {
    "adam": lambda params, config: torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay),
    "adamw": lambda params, config: torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay),
    "sgd": lambda params, config: torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                                  weight_decay=config.weight_decay, nesterov=config.nesterov),
}


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters training updates: all but those a frozen backbone stage keeps fixed."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def lr_factor(config: OptimConfig, total: int) -> Callable[[int], float]:
    """The learning rate's multiplier after ``done`` schedule steps of ``total``: the warm-up ramp times the
    schedule.

    ``linear`` is Reptile's annealing (Nichol et al.): step i of E (0-based) uses lr * (1 - i / E), reaching 0 after
    the last; ``cosine`` follows half a cosine from lr to 0 over E. Both follow ``total`` (the recipe's length): a
    run resumed with the same length continues the schedule exactly; one resumed with a longer one continues on the
    longer curve from where it stands, as if it had been planned that long."""
    warmup = config.warmup
    schedules: dict[str, Callable[[int], float]] = {
        "step": lambda done: config.lr_gamma ** (done // config.lr_step) if config.lr_step else 1.0,
        "multistep": lambda done: _multistep(config, bisect.bisect_right(config.lr_milestones, done)),
        "linear": lambda done: max(0.0, 1 - done / total),
        "cosine": lambda done: 0.5 * (1 + math.cos(math.pi * min(done, total) / total)),
    }
    schedule = schedules[config.lr_schedule]
    return lambda done: (min(1.0, (done + 1) / warmup) if warmup else 1.0) * schedule(done)


def _multistep(config: OptimConfig, passed: int) -> float:
    """The multistep factor once ``passed`` milestones are behind: ``lr_factors``' entry, or ``lr_gamma`` to that power."""
    if config.lr_factors:
        return config.lr_factors[passed - 1] if passed else 1.0
    return config.lr_gamma ** passed


def make_optimizer(config: OptimConfig, parameters: list[nn.Parameter], total: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer over ``parameters`` and its schedule (``lr_factor``), stepped once per schedule unit."""
    optimizer = OPTIMIZERS[config.optimizer](parameters, config)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total))


def first_schedule_difference(before: OptimConfig, before_total: int, now: OptimConfig, now_total: int, steps: int) -> int | None:
    """The first of schedule steps 0 .. ``steps`` - 1 at which the two schedules give different learning rates (each
    over its own total), or None: a branch is exact only where the steps already taken agree, bit for bit."""
    old, new = lr_factor(before, before_total), lr_factor(now, now_total)
    return next((step for step in range(steps) if before.lr * old(step) != now.lr * new(step)), None)
