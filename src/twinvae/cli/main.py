"""Entry point of the `twinvae` command line."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from twinvae import __version__
from twinvae.cli import data, demo, experiment, export, knime, synth, train, zoo
from twinvae.cli.common import err_console, rich_display
from twinvae.errors import TwinVAEError
from twinvae.progress import use_display

app = typer.Typer(
    name="twinvae",
    help="Twin-VAE cell counting: synthetic data, training, transfer learning, "
    "bioimage.io export, model zoo and KNIME workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


def main() -> None:
    """Run the CLI; user errors become one red line and exit code 1, not a traceback."""
    try:
        with use_display(rich_display):
            app()  # standalone mode: usage errors are reported by typer itself (exit code 2)
    except TwinVAEError as error:
        err_console.print(f"[bold red]Error:[/] {escape(str(error))}", highlight=False)
        sys.exit(1)
