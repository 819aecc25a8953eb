"""Where a method runs: the recipe's ``device`` (auto | cpu | cuda | cuda:N) resolved on this machine. Inputs
follow the method: training and evaluation move each episode to the device of the method's parameters, so nothing
else needs to know where that is. All random draws stay on the CPU generators, so a run resumes exactly wherever
it continues."""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from fsltool.errors import FsltoolError

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto``: CUDA where torch sees a GPU, else the CPU. Under torchrun, ``auto`` and ``cuda`` mean this
    process's GPU (LOCAL_RANK). A GPU that is asked for and missing is an error, never a silent fallback."""
    if not DEVICE_NAME.fullmatch(name):
        raise FsltoolError(f"{key}: {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FsltoolError(f"{key}: {name!r} asked for, but torch sees no CUDA device (torch {torch.__version__}, "
                           f"CUDA build: {torch.version.cuda or 'no'}); use cpu or auto")
    index = int(name.split(":")[1]) if ":" in name else int(os.environ.get("LOCAL_RANK", 0))
    if index >= torch.cuda.device_count():
        raise FsltoolError(f"{key}: {name!r}: GPU {index} asked for, but torch sees {torch.cuda.device_count()}")
    return torch.device("cuda", index)


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device
