"""The one exception type a user sees: a clear, one-line message and a non-zero exit code."""

from __future__ import annotations


class FsltoolError(Exception):
    """A problem with the user's input (file, key or value), reported as one line without a traceback."""

    exit_code = 2
    label = "error"


class RunStopped(FsltoolError):
    """A training run stopped by SIGINT or SIGTERM after saving its progress: exit code 128 + the signal's number,
    as a shell reports a process the signal ended."""

    label = "stopped"

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class BadImageError(FsltoolError):
    """An image file that cannot be decoded; names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: unreadable image ({reason})")
        self.path = path
