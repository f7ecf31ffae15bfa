"""twinvae's own warnings on the command line: one "Warning:" message each, no source line."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.text import Text

from twinvae.cli.common import err_console
from twinvae.errors import TwinVAEWarning


def print_warning(message: str) -> None:
    """A yellow "Warning:" and the message on stderr (kept as written: no markup, no wrapping)."""
    err_console.print(Text("Warning: ", style="yellow") + Text(message), soft_wrap=True)


@contextmanager
def plain_warnings() -> Iterator[None]:
    """Show TwinVAEWarning (skipped inputs, ...) with `print_warning` while the block runs.

    Python's default format starts with the file and line of the code that warned, which means
    nothing to a user; warnings of other libraries keep that format.
    """
    original = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, TwinVAEWarning):
            print_warning(str(message))
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
