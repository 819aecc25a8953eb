"""A full disk (or quota) met while writing: checked before large writes whose size is known, and a write that fails
anyway reported as one line naming the file, never a traceback or a crash inside a library."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from fsltool.errors import FsltoolError

OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}


def out_of_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in OUT_OF_SPACE


def no_space_error(path: Path | str, what: str) -> FsltoolError:
    """The one-line error for a write to ``path`` that found no space; ``what`` says what was being written."""
    return FsltoolError(f"{path}: no space left on device while writing {what}; nothing partial was left behind")


def write_error(path: Path | str, what: str, error: OSError) -> FsltoolError:
    """A failed write as one line: the no-space message for a full disk or quota, else the OS's reason."""
    if out_of_space(error):
        return no_space_error(path, what)
    return FsltoolError(f"{path}: could not write {what} ({error.strerror or error})")


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes to ``path`` (a file to be made in an existing folder) when its file
    system has less free space than that."""
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise FsltoolError(f"{path}: no space left on device for {what}: needs up to {_size(needed)}, "
                           f"{_size(free)} free on {path.parent}")


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
