"""One writer per output folder: a run folder (meta-train, pretrain) or an export folder is locked for the writer's
lifetime, so two processes started into the same folder cannot interleave their metrics and checkpoints.

The lock is an OS advisory lock (flock; on Windows a locked byte) on ``.fsltool.lock`` in the folder, which holds
the owner's pid for the message a second writer gets. The OS drops the lock when its process dies, however it
dies, so a lock file left by a killed process is simply taken over."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from types import TracebackType

from fsltool.errors import FsltoolError

LOCK_NAME = ".fsltool.lock"

if sys.platform == "win32":
    import msvcrt

    _LOCK_OFFSET = 2**30  # beyond the pid: on Windows a locked byte cannot be read by others

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def lock_holder(folder: str | Path) -> int | None:
    """The pid of the process holding ``folder`` now (0 while it has not written it yet), or None where no process
    does (a lock file a killed process left counts as free). Probes by taking the lock for an instant: a writer
    starting in that instant is refused as if the folder were in use."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None
        text = path.read_text().strip()
        return int(text) if text.isdigit() else 0
    except OSError:
        return None
    finally:
        os.close(fd)


class FolderLock:
    """Hold ``folder`` for this process (``with FolderLock(folder, "run folder"):``); creates the folder if needed and, on
    release, removes it again if the lock file was all it ever held (a run refused before it wrote anything)."""

    def __init__(self, folder: str | Path, noun: str) -> None:
        self.folder = Path(folder)
        self.noun = noun  # what the folder is, for messages: run folder, export folder
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created_folder = False

    def acquire(self) -> FolderLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise FsltoolError(f"{self.folder}: output exists and is not a folder")
        try:
            self._created_folder = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                if not _try_lock(fd):
                    os.close(fd)
                    raise FsltoolError(f"{self.folder}: this {self.noun} is in use by another fsltool process ({self._holder()}, "
                                       f"lock file {self.path}); wait for it to finish or stop it")
                if self._same_file(fd):  # not a lock file its previous owner unlinked while we opened it: ours
                    self._fd = fd
                else:
                    os.close(fd)
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()}\n".encode())
        except OSError as error:
            self.release()
            raise FsltoolError(f"{self.folder}: cannot write the {self.noun} ({error.strerror or error})") from None
        except BaseException:
            self.release()
            raise
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "pid not yet written"

    def release(self) -> None:
        """Unlink the lock file while still holding it (a process waiting on the old file then sees it is gone and
        retries), then drop the lock; an empty folder this lock created goes too."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None
        if self._created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only succeeds when empty
            self._created_folder = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()
