"""Entry point of the `twinvae` command line."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from twinvae import __version__
from twinvae.cli import data, demo, experiment, export, knime, synth, train, zoo
from twinvae.cli.common import HelpGroup, err_console, rich_display, use_help_group
from twinvae.cli.notices import plain_warnings
from twinvae.cli.process import keep_freed_memory, sigterm_as_exit
from twinvae.errors import TwinVAEError
from twinvae.progress import use_display

app = typer.Typer(
    name="twinvae",
    help="Twin-VAE cell counting: synthetic data, training, transfer learning, "
    "bioimage.io export, model zoo and KNIME workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help, not typer's rich panels: typer 0.29's rich renderer prints a type for
    # every option, flags included (`--help <bool>`), and its five-column table leaves the
    # descriptions about 30 characters at 80 columns. Propagates to every command and group.
    rich_markup_mode=None,
    cls=HelpGroup,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"twinvae {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Twin-VAE cell counting for bright-field (BF) and phase-contrast (PC) microscopy."""


for module in (synth, data, train, export, zoo, knime, experiment, demo):
    module.register(app)
use_help_group(app)  # also the groups that the modules add (data, zoo, knime, ...)


def main() -> None:
    """Run the CLI; user errors become one red line and exit code 1, not a traceback; twinvae's
    warnings become one "Warning:" message each."""
    keep_freed_memory()  # process-wide: the command's own process only, never library calls
    try:
        # sigterm_as_exit: `kill PID` cleans up run folders as Ctrl-C does
        with use_display(rich_display), plain_warnings(), sigterm_as_exit():
            app()  # standalone mode: usage errors are reported by typer itself (exit code 2)
    except TwinVAEError as error:
        # soft_wrap: the message stays one line (file names are not broken at the width)
        err_console.print(
            f"[bold red]Error:[/] {escape(str(error))}", highlight=False, soft_wrap=True
        )
        sys.exit(1)
