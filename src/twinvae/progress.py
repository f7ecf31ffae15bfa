"""Progress reporting without a user interface: library code reports, the caller decides how.

Library functions take ``progress: bool`` and report through `bar` / `track`. Nothing is shown
unless a front end installs a display with `use_display` (the CLI installs rich progress bars);
KNIME nodes, notebooks and tests get the silent default. This keeps the library free of any
import of `twinvae.cli`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, TypeVar

T = TypeVar("T")


class Task(Protocol):
    """One running progress bar."""

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` more units of work as done."""

    def describe(self, description: str) -> None:
        """Replace the bar's label (e.g. the current epoch)."""


Display = Callable[[str, "int | None"], AbstractContextManager[Task]]
"""Opens a bar with a label and a total (None: unknown) for the life of a ``with`` block."""


class _SilentTask:
    def advance(self, steps: int = 1) -> None:
        pass

    def describe(self, description: str) -> None:
        pass


@contextmanager
def _silent(description: str, total: int | None) -> Iterator[Task]:
    yield _SilentTask()


_display: Display = _silent


@contextmanager
def use_display(display: Display) -> Iterator[None]:
    """Show the progress of library calls inside the block with ``display``; restores the
    previous display afterwards."""
    global _display
    previous, _display = _display, display
    try:
        yield
    finally:
        _display = previous


def bar(description: str, total: int | None, enabled: bool = True) -> AbstractContextManager[Task]:
    """A progress bar from the installed display (silent when ``enabled`` is false)."""
    return (_display if enabled else _silent)(description, total)


def track(
    items: Iterable[T], description: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar."""
    with bar(description, total, enabled) as task:
        for item in items:
            yield item
            task.advance()
