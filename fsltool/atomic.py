"""Atomic file writes: a temporary file beside the target, fsync, then one rename. A crash or error
at any moment leaves either the old file or the complete new one, never a partial file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from fsltool.errors import FsltoolError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only when the block succeeds."""
    if path.exists() and not overwrite:
        raise FsltoolError(f"{path}: already exists (pass --force to replace it)")
    directory = path.parent
    if not directory.is_dir():
        raise FsltoolError(f"{directory}: output folder does not exist")
    try:
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".partial")
    except OSError as error:
        raise FsltoolError(f"{directory}: cannot write here ({error.strerror or error})") from None
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file and atomically put it at ``path``."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        write(file)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; when the block succeeds it takes ``path``'s place, else it
    is deleted and ``path`` is left as it was. Several files then change together: a reader sees the old set or the
    new one, never a mix. An existing ``path`` is swapped out by two renames (a crash between them leaves it as a
    hidden ``.NAME.*.old`` folder beside it) and then deleted."""
    parent = path.parent
    if not parent.is_dir():
        raise FsltoolError(f"{parent}: output folder does not exist")
    try:
        temporary = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.", suffix=".partial"))
    except OSError as error:
        raise FsltoolError(f"{parent}: cannot write here ({error.strerror or error})") from None
    os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
    try:
        yield temporary
        if not path.exists():
            os.rename(temporary, path)
            return
        previous = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.", suffix=".old"))
        try:
            os.replace(path, previous)  # onto the empty folder just made: a fresh name no other writer takes
        except BaseException:
            previous.rmdir()
            raise
        try:
            os.rename(temporary, path)
        except BaseException:
            os.rename(previous, path)
            raise
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_json(target: str, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON on stdout (``target`` "-") or atomically into the file ``target``; a file that
    cannot be written is a one-line error naming it."""
    text = json.dumps(payload, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        atomic_write(Path(target), lambda file: file.write(text.encode()))
    except OSError as error:
        raise FsltoolError(f"{target}: cannot write ({error.strerror or error})") from None
