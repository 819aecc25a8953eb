"""Process-level settings that measurably speed up CPU training and inference."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_SETTINGS = ("MMAP_THRESHOLD", "MMAP_MAX", "TRIM_THRESHOLD")  # glibc's names of what tune_allocator decides


def _user_tunes_allocator(environ: Mapping[str, str]) -> bool:
    """The user set one of these through the environment (MALLOC_MMAP_MAX_ or GLIBC_TUNABLES=glibc.malloc.mmap_max=...):
    glibc applied it at start-up, and mallopt would silently override it."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(f"MALLOC_{name}_" in environ or f"glibc.malloc.{name.lower()}=" in tunables for name in _SETTINGS)


def tune_allocator() -> None:
    """Keep freed large blocks in glibc's heap for reuse instead of returning them to the OS.

    Conv-4 steps allocate and free the same large activations every step (hundreds of MiB at 60w5s5q); by default
    glibc maps each block above its mmap threshold afresh, unmaps it when freed and pays the page faults again next
    step. mallopt's M_MMAP_MAX = 0 (no mmap for allocations) with trimming off is what glibc's start-up tunables
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 achieve, applied in-process (no re-exec of a
    console script) and accepted by every glibc (older ones refuse an mmap threshold above 32 MiB, too low for these
    steps); measured as fast as those tunables (docs/speed.md, scripts/benchmark_allocator.py).
    The price: a process's resident memory stays at its peak until it exits.
    """
    if not sys.platform.startswith("linux") or _user_tunes_allocator(os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim (mallopt(3))
