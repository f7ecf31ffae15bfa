"""CLI command: `twinvae synth`, generate a folder of synthetic cell images + counts.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import typer
from rich.table import Table

from twinvae import __version__
from twinvae.cli.common import console, make_progress
from twinvae.errors import ConfigError

SYNTH_CONFIG_FILE = "synth_config.yaml"
_BATCH = 1024
_BAR_WIDTH = 30


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("synth")(synth_command)


def synth_command(
    modality: Literal["bf", "pc"] | None = typer.Option(
        None,
        "--modality",
        "-m",
        help="bf (bright-field) or pc (phase-contrast); selects the per-modality defaults. "
        "Required unless --config is given.",
    ),
    count: int = typer.Option(1000, "--count", "-n", min=1, help="Number of images to generate."),
    seed: int = typer.Option(
        0, "--seed", min=0, help="Random seed; the same seed gives byte-identical files."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder (created; must be empty unless --overwrite)."
    ),
    background: Path | None = typer.Option(
        None,
        "--background",
        help="Background image (PNG/JPEG/TIFF of image_size x image_size pixels, made grey); "
        "default: flat grey of the modality.",
    ),
    style: Literal["synthetic", "natural"] | None = typer.Option(
        None,
        "--style",
        help="synthetic: the paper's generator; natural: textured, unevenly lit stand-in for "
        "real microscope images (default: synthetic, or the value in --config).",
    ),
    distribution: Literal["paper", "uniform"] | None = typer.Option(
        None,
        "--distribution",
        help="Cell count distribution: paper (P(n) falling linearly, 36 - n) or uniform "
        "(default: paper, or the value in --config).",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="Generator settings YAML (e.g. a saved synth_config.yaml); the options above "
        "override it.",
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        max=64,
        help="Threads for rendering and PNG encoding (the output is the same).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into a non-empty folder, replacing same-named files."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Generate COUNT synthetic cell images as PNGs plus counts.csv and synth_config.yaml."""
    from twinvae.data.synthetic import (
        SyntheticStream,
        config_from_dict,
        image_names,
        load_background,
        load_synth_config,
    )
    from twinvae.data.writer import ImageFolderWriter, check_output_folder, write_atomic

    overrides: dict[str, Any] = {}
    if style is not None:
        overrides["style"] = style
    if distribution is not None:
        overrides["count_distribution"] = distribution
    if config is not None:
        settings = load_synth_config(config, **overrides)
        if modality is not None and modality != settings.modality:
            raise ConfigError(
                f"--modality {modality} conflicts with modality {settings.modality} in {config}; "
                "leave out one of them"
            )
    elif modality is None:
        raise ConfigError("give --modality bf|pc (or --config with a generator settings file)")
    else:
        settings = config_from_dict({"modality": modality, **overrides}, "command line options")

    check_output_folder(out, overwrite)
    image_background = None
    if background is not None:
        image_background = load_background(background, settings.image_size)
    stream = SyntheticStream(settings, seed, image_background, workers=workers)
    writer = ImageFolderWriter(out, overwrite=overwrite, workers=workers)
    counts = np.empty(count, dtype=np.int16)
    grey_sum = 0.0
    with make_progress(progress) as bar:
        task = bar.add_task("generating", total=count)
        for start in range(0, count, _BATCH):
            stop = min(start + _BATCH, count)
            images, batch_counts = stream.next_batch(stop - start)
            writer.add(image_names(settings, start, stop), images, batch_counts)
            counts[start:stop] = batch_counts
            grey_sum += float(images.sum(dtype=np.float64))
            bar.advance(task, stop - start)
    writer.finish()
    header = [
        f"# twinvae {__version__} synth: --count {count} --seed {seed}",
        f"# background: {background.name if background is not None else 'flat background_grey'}",
    ]
    write_atomic(
        writer.folder / SYNTH_CONFIG_FILE,
        ("\n".join(header) + "\n" + settings.to_yaml()).encode("utf-8"),
    )
    mean_grey = grey_sum / (count * settings.image_size**2)
    _print_summary(out, settings.modality, settings.style, counts, mean_grey)


def _print_summary(
    out: Path, modality: str, style: str, counts: np.ndarray, mean_grey: float
) -> None:
    histogram = np.bincount(counts)
    table = Table(title=f"{len(counts)} {style} {modality.upper()} images in {out}")
    table.add_column("cells", justify="right")
    table.add_column("images", justify="right")
    table.add_column("")
    peak = max(int(histogram.max()), 1)
    for cells, images in enumerate(histogram):
        if images:
            bar = "█" * max(1, round(_BAR_WIDTH * int(images) / peak))
            table.add_row(str(cells), str(int(images)), bar)
    console.print(table)
    console.print(
        f"mean grey {mean_grey:.1f} ({mean_grey / 255:.3f}), cells per image "
        f"{counts.mean():.2f} (min {counts.min()}, max {counts.max()}); "
        f"files: PNGs, counts.csv, {SYNTH_CONFIG_FILE}",
        highlight=False,
    )
