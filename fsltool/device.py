"""Where a method runs: the recipe's ``device`` (auto | cpu | cuda | cuda:N) resolved on this machine. Inputs
follow the method: training and evaluation move each episode to the device of the method's parameters, so nothing
else needs to know where that is. All random draws stay on the CPU generators, so a run resumes exactly wherever
it continues."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass

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


def machine_description(device: torch.device, processes: int = 1) -> str:
    """What a run trains on, for the record of its budget and of its rounding: the GPU, or the processor, the
    vector instructions torch's CPU kernels use (AVX2, AVX512: other kernels, other rounding, so a run resumed on
    the other kind is exact but no longer bit for bit what one machine would give) and its cores; torch's version
    and threads; the data-parallel processes."""
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores")
    threads = torch.get_num_threads()
    text = f"{where}, torch {torch.__version__}, {threads} thread{'s' if threads > 1 else ''}"
    return text + (f", {processes} processes" if processes > 1 else "")


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; elsewhere what the platform module knows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device


def prepare_device(device: torch.device, *, repeating_shapes: bool) -> None:
    """Every process-wide setting of a CUDA device, in this one place (nothing on the CPU).

    TF32 off for matrix products, convolutions and RNNs: ``precision: fp32`` means IEEE fp32 on a GPU as on the
    CPU (CUDA and CPU evaluations of one checkpoint agree; ``precision: bf16`` is the fast setting). cuDNN's
    autotuner (``cudnn.benchmark``) where ``repeating_shapes``: training repeats one episode shape, so the search
    on its first step pays for itself; evaluation and inference meet shapes once (every way, shot and last batch),
    so they keep cuDNN's heuristics."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    torch.backends.cudnn.benchmark = repeating_shapes


@dataclass(frozen=True)
class WorkSizes:
    """How much work one call takes, by device type: the CPU's values were measured on 2 cores (cache-sized
    passes are fastest there; see docs/speed.md); a GPU wants wide passes to fill it and has the memory for them."""

    embed_images: int  # images per embedding pass in evaluation
    gather_bytes: int  # ... read (as float32 pixels) a block of at most this many bytes at a time, then embedded
    score_elements: int  # episodes x queries x way x feature size per scoring call (memory)
    adapt_episodes: int  # episodes evaluation hands a test-time-adapting method (MAML, Reptile) per call
    adapt_images: int  # ... adapted side by side in groups of at most this many images (support + queries)
    sequences: int  # labelled sequences per call (evaluate --by-instance)
    inner_loop_tasks: int  # MAML meta-training: tasks per inner-loop pass (bounds the kept graphs' memory)
    query_tasks: int  # MAML meta-training: tasks per query pass


# The CUDA values are a GPU's usual widths, not yet measured on one (docs/gpu.md).
WORK_SIZES = {
    "cpu": WorkSizes(embed_images=64, gather_bytes=16 * 2**20, score_elements=2**24, adapt_episodes=64, adapt_images=4096, sequences=64,
                     inner_loop_tasks=8, query_tasks=4),
    "cuda": WorkSizes(embed_images=1024, gather_bytes=256 * 2**20, score_elements=2**27, adapt_episodes=256, adapt_images=32768, sequences=512,
                      inner_loop_tasks=32, query_tasks=32),
}


def work_sizes(device: torch.device) -> WorkSizes:
    """The work sizes of ``device``'s type (the CPU's for a type without its own)."""
    return WORK_SIZES.get(device.type, WORK_SIZES["cpu"])
