"""Helpers shared by the CLI modules: console, progress bars, error reporting."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from twinvae.progress import Task

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


class _RichTask:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def advance(self, steps: int = 1) -> None:
        self._progress.advance(self._task, steps)

    def describe(self, description: str) -> None:
        self._progress.update(self._task, description=description)


@contextmanager
def rich_display(description: str, total: int | None) -> Iterator[Task]:
    """The CLI's display for `twinvae.progress`: a rich bar on stderr when it is a terminal."""
    with make_progress() as progress:
        yield _RichTask(progress, progress.add_task(description, total=total))
