"""CLI commands: zoo list | build | check | add (the model zoo in model_zoo/)."""

from __future__ import annotations

from pathlib import Path

import typer

from twinvae.cli.common import console, err_console

zoo_app = typer.Typer(
    name="zoo",
    help="The model zoo: published models, rebuilt as bioimage.io bundles from stored weights.",
    no_args_is_help=True,
)

ZOO_DIR_HELP = (
    "Zoo folder holding collection.yaml (default: $TWINVAE_ZOO_DIR or the repo's model_zoo/)."
)


def _zoo_dir(zoo_dir: Path | None) -> Path:
    from twinvae.model_zoo import default_zoo_dir

    return zoo_dir if zoo_dir is not None else default_zoo_dir()


@zoo_app.command("list")
def list_command(
    zoo_dir: Path | None = typer.Option(None, "--zoo-dir", help=ZOO_DIR_HELP),
) -> None:
    """One line per model: name, modality, test metrics, recipe, and what its weights hold
    (the whole Twin-VAE, or only the counting path: then fine-tuning from it is natural-only)."""
    from twinvae.model_zoo import load_manifest

    folder = _zoo_dir(zoo_dir)
    manifest = load_manifest(folder)
    if not manifest.models:
        err_console.print(f"no models in {folder / 'collection.yaml'}", highlight=False)
    for entry in manifest.models:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(entry.metrics.items())) or "-"
        holds = "whole Twin-VAE" if entry.weights_kind == "twin-vae" else "counting path only"
        typer.echo(f"{entry.name}\t{entry.modality}\t{metrics}\t{entry.recipe}\t{holds}")


@zoo_app.command("build")
def build_command(
    name: str = typer.Argument(..., help="Model name as listed by `twinvae zoo list`."),
    out: Path = typer.Option(
        Path("."),
        "--out",
        "-o",
        help="Folder to write NAME.zip into (a folder, not a file name: the bundle is named "
        "after the model).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing NAME.zip."),
    zoo_dir: Path | None = typer.Option(None, "--zoo-dir", help=ZOO_DIR_HELP),
) -> None:
    """Rebuild a model's bundle from the stored weights (validated; same bytes every time)."""
    from twinvae.model_zoo import build_entry, load_manifest

    # Like `export --out`, a .zip here reads as the bundle's file name; building would make a
    # folder of that name instead, so say what --out means.
    if out.suffix.lower() == ".zip" and not out.is_dir():
        raise typer.BadParameter(
            f"{out} is a .zip file name; give the folder to write {name}.zip into, "
            f"e.g. --out {out.parent}",
            param_hint="--out",
        )
    folder = _zoo_dir(zoo_dir)
    result = build_entry(folder, name, out, overwrite=overwrite)
    expected = load_manifest(folder).get(name).bundle_sha256
    console.print(f"[bold green]Wrote[/] {result.path} ({result.seconds:.1f} s)", highlight=False)
    console.print(f"sha256 {result.sha256}")
    if result.sha256 != expected:
        err_console.print(
            f"[yellow]note:[/] the manifest records sha256 {expected}; run `twinvae zoo check` "
            "to see whether package versions explain the difference",
            highlight=False,
        )


@zoo_app.command("check")
def check_command(
    zoo_dir: Path | None = typer.Option(None, "--zoo-dir", help=ZOO_DIR_HELP),
) -> None:
    """Validate every model: stored files, a rebuilt and validated bundle, its test outputs
    against the recorded ones (difference vs tolerance), and each member's sha256."""
    from rich.markup import escape

    from twinvae.model_zoo import check_zoo

    folder = _zoo_dir(zoo_dir)
    results = check_zoo(folder)
    for result in results:
        mark = "[green]ok[/]" if result.passed else "[bold red]FAILED[/]"
        console.print(f"{result.name}  {mark}  {escape(result.detail)}", highlight=False)
        for warning in result.warnings:
            console.print(f"  [yellow]warning:[/] {escape(warning)}", highlight=False)
    if not results:
        console.print(f"no models in {folder / 'collection.yaml'}: nothing to check")
    failed = [r.name for r in results if not r.passed]
    if failed:
        err_console.print(f"[bold red]zoo check failed:[/] {', '.join(failed)}", highlight=False)
        raise typer.Exit(1)


@zoo_app.command("add")
def add_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.pt) or run folder to publish."),
    name: str = typer.Option(
        ..., "--name", help="Zoo name saying the modality, e.g. cho-k1-pc-paper."
    ),
    metrics: Path | None = typer.Option(
        None,
        "--metrics",
        help="Metrics on the test split: a `twinvae evaluate --json` report or a JSON object.",
    ),
    recipe: str | None = typer.Option(None, "--recipe", help="Training recipe in a few words."),
    description: str = typer.Option("", "--description", help="Description for the bundle."),
    authors: list[str] = typer.Option(
        ["twinvae contributors"],
        "--author",
        metavar="NAME",
        help="Bundle author (repeat for several).",
    ),
    version: str = typer.Option("0.1.0", "--version", help="Version of the model."),
    with_mu: bool = typer.Option(False, "--with-mu", help="Bundle with the latent mu output."),
    test_data: str | None = typer.Option(
        None,
        "--test-data",
        help="Images to test the bundle on, relative to the zoo folder (default: generated).",
    ),
    replace: bool = typer.Option(False, "--replace", help="Replace an entry of the same name."),
    zoo_dir: Path | None = typer.Option(None, "--zoo-dir", help=ZOO_DIR_HELP),
) -> None:
    """Publish a checkpoint: store its weights (safetensors), build, validate, record it."""
    from twinvae.export.bundle import load_metrics_json
    from twinvae.model_zoo import add_entry

    folder = _zoo_dir(zoo_dir)
    entry = add_entry(
        folder,
        checkpoint,
        name,
        recipe=recipe,
        description=description,
        metrics=load_metrics_json(metrics) if metrics is not None else None,
        authors=tuple(authors),
        version=version,
        with_mu=with_mu,
        test_data=test_data,
        replace=replace,
    )
    console.print(
        f"[bold green]Added[/] {entry.name} ({entry.weights}, bundle sha256 {entry.bundle_sha256})",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.add_typer(zoo_app, name="zoo")
