"""CLI commands: knime (generate the KNIME workflows)."""

from __future__ import annotations

from pathlib import Path

import typer

from twinvae.cli.common import console

knime_app = typer.Typer(
    name="knime",
    help="KNIME Analytics Platform workflows that count cells with exported model bundles.",
    no_args_is_help=True,
)


@knime_app.command("build")
def build(
    out: Path = typer.Option(..., "--out", help="Folder that receives the workflow folders."),
    bundle: Path | None = typer.Option(
        None,
        "--bundle",
        help="Model bundle (.zip or folder with rdf.yaml) to ship as data/model.zip in the count "
        "and growth workflows; also writes ready-to-import .knwf archives.",
    ),
    samples: Path | None = typer.Option(
        None,
        "--samples",
        help="Folder of sample images to ship in the count workflow's data/samples.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace workflow folders and .knwf archives that exist already."
    ),
    knwf: bool | None = typer.Option(
        None,
        "--knwf/--no-knwf",
        help="Write .knwf archives next to the folders (default: only when --bundle is given).",
    ),
) -> None:
    """Write the Count cells, Growth curves and Fine-tune workflows (deterministic output)."""
    from twinvae.knime.builders import build_workflows

    result = build_workflows(out, bundle=bundle, samples=samples, overwrite=overwrite, knwf=knwf)
    for folder in result.folders:
        console.print(f"workflow folder  {folder}")
    for archive in result.archives:
        console.print(f"KNIME archive    {archive}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.add_typer(knime_app, name="knime")
