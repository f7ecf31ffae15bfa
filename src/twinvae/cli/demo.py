"""CLI command: demo (the main job, end to end on generated data)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape

from twinvae.cli.common import OVERRIDE_METAVAR, console


def demo_command(
    out: Path = typer.Option(
        Path("twinvae-demo"), "--out", "-o", help="Folder for everything the demo makes."
    ),
    modality: str = typer.Option(
        "pc",
        "--modality",
        help="Image style to generate: pc (phase contrast) or bf (bright field).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the generated data."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        "-s",
        metavar=OVERRIDE_METAVAR,
        help="Override the quick-cpu training config, e.g. --set train.epochs=2.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the output of an earlier demo in --out."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Run the main job on generated data.

    Generates data, trains quick-cpu, evaluates, exports and validates a bioimage.io bundle,
    predicts with it and builds the KNIME workflows, all under --out.
    """
    from twinvae.demo import DemoStep, run_demo

    if modality not in ("pc", "bf"):
        raise typer.BadParameter("expected pc or bf", param_hint="--modality")
    started = time.perf_counter()

    # One line per step as it finishes, and no table of the same steps at the end.
    def report(step: DemoStep) -> None:
        console.print(
            f"[green]✓[/] {escape(step.name)} ({step.seconds:.0f} s): {escape(step.output)}  "
            f"{escape(step.detail)}",
            highlight=False,
        )

    run_demo(
        out,
        modality=modality,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
        overrides=overrides,
        report=report,
    )
    seconds = time.perf_counter() - started
    console.print(
        f"demo done in {seconds:.0f} s; all output is in {escape(str(out))}", highlight=False
    )


def register(app: typer.Typer) -> None:
    """Add demo to the main app."""
    app.command("demo", help=demo_command.__doc__)(demo_command)
