"""Shared terminal output: one rich console on stderr for progress and messages, and one on stdout for results
that are a table or a view (`info`, `recipes list`, accuracy by instance), so that they pipe and redirect."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
results = Console()


def progress_bar(*extra_columns: TextColumn, quiet: bool = False) -> Progress:
    """A progress bar on stderr; disabled (but still usable) when ``quiet``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )
