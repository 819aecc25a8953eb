"""The one exception type a user sees: a clear, one-line message and a non-zero exit code."""

from __future__ import annotations


class FsltoolError(Exception):
    """A problem with the user's input (file, key or value), reported as one line without a traceback."""

    exit_code = 2


class BadImageError(FsltoolError):
    """An image file that cannot be decoded; names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: unreadable image ({reason})")
        self.path = path
