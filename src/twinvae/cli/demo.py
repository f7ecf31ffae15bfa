"""CLI command: demo (the main job, end to end on generated data)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from twinvae.cli.common import console


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
        [], "--set", "-s", help="Override the quick-cpu training config, e.g. --set train.epochs=2."
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

    def report(step: DemoStep) -> None:
        console.print(
            f"[green]✓[/] {step.name} ({step.seconds:.0f} s): {step.output}  {step.detail}"
        )

    result = run_demo(
        out,
        modality=modality,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
        overrides=overrides,
        report=report,
    )
    table = Table(title=f"twinvae demo: {out}")
    for column in ("step", "output", "seconds", "result"):
        table.add_column(column)
    for step in result.steps:
        table.add_row(step.name, step.output, f"{step.seconds:.1f}", step.detail)
    console.print(table)
    console.print(f"total {time.perf_counter() - started:.0f} s")


def register(app: typer.Typer) -> None:
    """Add demo to the main app."""
    app.command("demo", help=demo_command.__doc__)(demo_command)
