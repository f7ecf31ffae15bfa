"""CLI commands: export (bioimage.io bundle), validate (check a bundle), predict (count cells)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import typer
from rich.markup import escape
from rich.table import Table

from twinvae.cli.common import console, err_console, make_progress, progress_enabled
from twinvae.errors import ConfigError

if TYPE_CHECKING:
    from twinvae.export.checks import ValidationReport

Modality = Literal["bf", "pc"]

# bioimageio.spec warns on every bundle without a GitHub account to maintain it (`maintainers`,
# or an author's `github_user`). twinvae has no account to name for the user's models, a made-up
# one would be looked up on GitHub during validation, and a new rdf.yaml field would change the
# zoo's recorded bundle hashes: so the CLI leaves out exactly this warning.
MAINTAINERS_WARNING = (
    "Missing `maintainers` or any author in `authors` with a specified `github_user` name."
)


def _worth_reading(warning: str) -> bool:
    return "all elements agree" not in warning and not warning.endswith(MAINTAINERS_WARNING)


@contextlib.contextmanager
def _status(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A rich status line (only on a terminal); yields a callback that updates its text."""
    if not progress_enabled(enabled):
        yield lambda _message: None
        return
    with err_console.status("starting") as status:
        yield lambda message: status.update(f"[bold]{message}")


def print_report(report: ValidationReport) -> None:
    """A table of check results, then the warnings worth reading (deduplicated) and the alerts
    (printed loudly: the model is unfit for use)."""
    table = Table(title=f"Validation of {report.bundle}", show_lines=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    table.add_column("s", justify="right")
    for check in report.checks:
        mark = (
            "[bold red]FAILED"
            if not check.passed
            else "[yellow]skipped"
            if check.skipped
            else "[bold red]ALERT"
            if check.alerts
            else "[green]passed"
        )
        table.add_row(check.name, mark, check.detail, f"{check.seconds:.1f}")
    console.print(table)
    warnings = dict.fromkeys(w.splitlines()[0] for c in report.checks for w in c.warnings)
    for warning in filter(_worth_reading, warnings):
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    print_alerts(report)


def print_alerts(report: ValidationReport) -> None:
    """The report's alerts, one bold line each."""
    for alert in report.alerts:
        console.print(f"[bold red]ALERT:[/] {escape(alert)}", highlight=False)


def _parse_timestamp(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--timestamp {value!r} is not an ISO 8601 date/time (e.g. 2024-05-01T12:00:00Z)"
        ) from None


def export_command(
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint (.pt) or run folder (best.pt is used, else last.pt)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle to write, e.g. cho-k1-pc.zip."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Real labelled images to test the bundle on (any layout twinvae reads; the test "
        "split of CHO-K1 folders). Default: generated natural-style images.",
    ),
    with_mu: bool = typer.Option(
        False,
        "--with-mu",
        help="Add the latent mean mu as a second output (for plots, clustering).",
    ),
    metrics: Path | None = typer.Option(
        None,
        "--metrics",
        help="Further metrics for the documentation: a `twinvae evaluate --json` report or a "
        "JSON object of name -> number.",
    ),
    name: str | None = typer.Option(
        None, "--name", help="Model name (letters, digits, spaces, -_+())."
    ),
    description: str | None = typer.Option(
        None, "--description", help="One-paragraph description."
    ),
    authors: list[str] = typer.Option(
        ["twinvae contributors"],
        "--author",
        metavar="NAME",
        help="Bundle author (repeat for several).",
    ),
    version: str = typer.Option("0.1.0", "--version", help="Version of the model bundle."),
    license_id: str = typer.Option("MIT", "--license", help="SPDX license id of the weights."),
    timestamp: str | None = typer.Option(
        None,
        "--timestamp",
        help="Creation time written to rdf.yaml (ISO 8601); default SOURCE_DATE_EPOCH or now.",
    ),
    check_images: int = typer.Option(
        16, "--check-images", min=1, help="How many images the weight formats are compared on."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle file."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
) -> None:
    """Export a checkpoint as a validated bioimage.io model bundle (ONNX, TorchScript, state dict).

    The bundle also attaches the whole Twin-VAE (twinvae_weights.safetensors) that twinvae
    transfer --from BUNDLE fine-tunes. The zip is built in a temporary folder and written only
    when every check passed.
    """
    from twinvae.export.bundle import ExportOptions, export_bundle, load_metrics_json
    from twinvae.export.rdf import BundleMetadata

    options = ExportOptions(
        with_mu=with_mu,
        data=data,
        check_images=check_images,
        overwrite=overwrite,
        metadata=BundleMetadata(
            name=name,
            description=description,
            authors=tuple(authors),
            version=version,
            license=license_id,
            timestamp=_parse_timestamp(timestamp),
            extra_metrics=load_metrics_json(metrics) if metrics is not None else {},
        ),
    )
    with _status(progress) as say:
        result = export_bundle(checkpoint, out, options, progress=say)
    print_report(result.report)
    console.print(f"[bold green]Wrote[/] {result.path}", highlight=False)
    console.print(f"sha256 {result.sha256}")
    console.print(
        f"test image count {result.test_prediction:.3f}; export and validation took "
        f"{result.seconds:.1f} s"
    )
    if result.report.alerts:  # written, but not fit for use: repeat it as the last word
        print_alerts(result.report)


def validate_command(
    bundle: Path = typer.Argument(..., help="Bundle zip to check."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Labelled images to compare the weight formats and measure the prediction spread "
        "on (default: the bundle's test input and flips/rotations of it for the comparison, "
        "generated images of the bundle's modality for the spread).",
    ),
    modality: Modality = typer.Option(
        "pc", "--modality", help="Modality to read from a CHO-K1 root folder given as --data."
    ),
    tolerance: float = typer.Option(
        5e-3,  # = twinvae.export.checks.DEFAULT_TOLERANCE (not imported: the CLI starts fast)
        "--tolerance",
        min=0.0,
        help="Largest accepted difference between weight formats, in counts.",
    ),
    trust_code: bool = typer.Option(
        False,
        "--trust-code",
        help="Also run and check the pytorch_state_dict weights: this imports the bundle's "
        "Python architecture file. Only for bundles whose code you trust.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
) -> None:
    """Run every export check on a bundle (files, sha256, contract, ONNX checker, weight-format
    agreement, the attached whole Twin-VAE, prediction spread, bioimage.io's model test); exit
    code 0 when valid, 1 otherwise.

    Runs no code from the bundle: the ONNX weights run in ONNX Runtime and the TorchScript
    weights load with torch.jit.load. The pytorch_state_dict weights need the bundle's Python
    architecture file and are only run and checked with --trust-code (reported as skipped
    otherwise). A model with (almost) constant predictions passes with an ALERT.
    """
    from twinvae.export.checks import validate_bundle
    from twinvae.export.images import load_check_images, to_model_space

    images = labels = None
    if data is not None:
        check_images = load_check_images(data, modality, count=64)
        images, labels = to_model_space(check_images.images), check_images.counts
    with _status(progress) as say:
        report = validate_bundle(
            bundle,
            images=images,
            labels=labels,
            tolerance=tolerance,
            trust_code=trust_code,
            progress=say,
        )
    print_report(report)
    if not report.passed:
        err_console.print(
            f"[bold red]Invalid bundle[/] {bundle}: {report.failure_message()}", highlight=False
        )
        raise typer.Exit(1)
    console.print(f"[bold green]Valid bundle[/] {bundle} ({report.seconds:.1f} s)", highlight=False)
    if report.skipped():
        names = ", ".join(check.name for check in report.skipped())
        console.print(f"[yellow]Not checked[/] (see the table): {names}", highlight=False)


def predict_command(
    bundle: Path = typer.Argument(..., help="Bundle zip (or folder with rdf.yaml)."),
    images: list[Path] = typer.Argument(
        ..., help="Image files and/or folders (searched recursively)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="CSV to write: file,count,count_rounded,chamber,frame."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing CSV."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per ONNX Runtime call."),
    cpu: bool = typer.Option(False, "--cpu", help="Use the CPU even when CUDA is available."),
    resize: bool = typer.Option(
        False,
        "--resize",
        help="Resize images of another size to 128x128 (bilinear) instead of failing.",
    ),
    skip_bad: bool = typer.Option(
        False,
        "--skip-bad",
        help="Leave unreadable images out of the CSV (and list them) instead of stopping.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Count cells in images with a bundle's ONNX weights (CUDA when available, else CPU)."""
    from twinvae.export.predict import collect_image_files, predict_to_csv

    total = len(collect_image_files(images))
    with make_progress(progress) as bar:
        task = bar.add_task("counting", total=total)
        summary = predict_to_csv(
            bundle,
            images,
            out,
            overwrite=overwrite,
            batch_size=batch_size,
            providers=["CPUExecutionProvider"] if cpu else None,
            resize=resize,
            progress=lambda done, todo: bar.update(task, completed=done, total=todo),
            skip_bad=skip_bad,
        )
    skipped = f", {len(summary.skipped)} skipped" if summary.skipped else ""
    console.print(
        f"[bold green]Wrote[/] {summary.out}: {summary.images} images{skipped} "
        f"({', '.join(summary.providers)}, batch {summary.batch_size})",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("export")(export_command)
    app.command("validate")(validate_command)
    app.command("predict")(predict_command)
