"""The allocator setting the CLI applies, observed in a fresh process: does a freed 100 MiB block stay in glibc's
heap for reuse (tuned), or is it mapped and unmapped (glibc's defaults, or the user's own settings)?"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

try:
    ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018  (glibc 2.33 or later)
except (OSError, AttributeError):
    pytest.skip("needs glibc's mallinfo2", allow_module_level=True)

# Runs the CLI's entry point with the given arguments (if any) in a fresh process, then reports whether a freed 100 MiB
# block stayed in the heap (mallinfo2: neither mapped on its own nor trimmed back to the OS).
PROBE = """
import ctypes, sys
from fsltool.cli import main
if sys.argv[1:]:
    main(sys.argv[1:], standalone_mode=False)
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
block = libc.malloc(100 * 2**20)
mapped = libc.mallinfo2().hblkhd >= 100 * 2**20
libc.free(block)
print("kept" if not mapped and libc.mallinfo2().fordblks >= 100 * 2**20 else "returned")
"""


def freed_block_after(arguments: list[str], **environ: str) -> str:
    """"kept" or "returned"; the process starts from this one's environment less any allocator setting, plus ``environ``."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", PROBE, *arguments], env={**clean, **environ}, capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_glibc_defaults_return_a_large_freed_block() -> None:
    """The control: without the CLI, glibc maps and unmaps the block, so the tests below can tell the two apart."""
    assert freed_block_after([]) == "returned"


@pytest.mark.parametrize("environ", [{}, {"MALLOC_ARENA_MAX": "2"}])
def test_the_cli_keeps_large_freed_blocks_for_reuse(environ: dict[str, str]) -> None:
    """Also when the user set an allocator option the CLI does not touch."""
    assert freed_block_after(["recipes", "list"], **environ) == "kept"


def test_no_tuning_leaves_the_allocator_at_its_defaults() -> None:
    assert freed_block_after(["--no-tuning", "recipes", "list"]) == "returned"


@pytest.mark.parametrize("environ", [{"MALLOC_MMAP_THRESHOLD_": "1048576"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}])
def test_the_users_own_allocator_settings_are_left_alone(environ: dict[str, str]) -> None:
    """A user's 1 MiB mmap threshold still maps the block: the CLI did not override it."""
    assert freed_block_after(["recipes", "list"], **environ) == "returned"
