"""Helpers shared by the CLI modules: console, progress bars, error reporting, help layout."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
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
from typer.core import TyperGroup

from twinvae.progress import Task

console = Console()
err_console = Console(stderr=True)

T = TypeVar("T")

# Metavar of options that set one config value per use (repeatable).
OVERRIDE_METAVAR = "KEY=VALUE"


def name_list_help(title: str, names: Sequence[str], width: int = 74) -> str:
    """A help paragraph listing names that click prints as it is (the leading \\b).

    click's wrapping breaks lines at hyphens, which would cut names like transfer-pc-to-bf in
    two; here lines break only between names. `width` keeps the lines within 80 columns.
    """
    lines = textwrap.wrap(
        f"{title} {', '.join(names)}.",
        width=width,
        break_on_hyphens=False,
        break_long_words=False,
    )
    return "\b\n" + "\n".join(lines)


def command_summary(command: Any) -> str:
    """The text a command list shows for a command: its short help, else the first sentence of
    its help (a sentence ends at ". " before a capital letter, so "e.g. a" does not end one)."""
    text = " ".join((command.short_help or command.help or "").split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", text, maxsplit=1)[0]


class HelpGroup(TyperGroup):
    """A command group that lists each command with its whole summary, wrapped.

    click cuts the summaries to one line with "..." (or at the first word ending in ".", such
    as "e.g."), which leaves half sentences at 80 columns.
    """

    # Any: the formatter and context types live in typer's private copy of click.
    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command_summary(command)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def use_help_group(app: typer.Typer) -> None:
    """Make every command group under app (not app itself) a `HelpGroup`."""
    for group in app.registered_groups:
        group.cls = HelpGroup
        if group.typer_instance is not None:
            use_help_group(group.typer_instance)


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
