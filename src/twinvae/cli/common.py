"""Helpers shared by the CLI modules: console, progress bars, error reporting."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
err_console = Console(stderr=True)

T = TypeVar("T")


def progress_enabled(requested: bool = True) -> bool:
    """Progress bars only when asked for and when stderr is a terminal."""
    return requested and sys.stderr.isatty()


def make_progress(enabled: bool = True) -> Progress:
    """A rich progress bar with count, elapsed time and ETA (disabled when not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        disable=not progress_enabled(enabled),
        transient=False,
    )


def track(
    items: Iterable[T], description: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Iterate with a progress bar."""
    with make_progress(enabled) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
