"""CLI commands: `twinvae data info` (Table 1-style overview of an image data set)."""

from __future__ import annotations

import json
import math
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from twinvae.cli.common import console, err_console
from twinvae.data.readers import NamedSet, SkippedInputWarning, load_splits, summarize
from twinvae.data.setnames import format_set_name

data_app = typer.Typer(
    name="data",
    help="Inspect image data sets (CHO-K1 layout or a folder of images with counts.csv).",
    no_args_is_help=True,
)

_BAR_WIDTH = 24
_MAX_HISTOGRAM_ROWS = 15


class SplitChoice(StrEnum):
    train = "train"
    test = "test"
    all = "all"


class ModalityChoice(StrEnum):
    bf = "bf"
    pc = "pc"
    all = "all"


def _paper_names(rows: list[tuple[NamedSet, dict[str, Any]]]) -> str:
    """Caption naming the sets as in the paper, e.g. "pc/train: L = Nat-PC-L-Tr, U = ..."."""
    parts = []
    for named, _ in rows:
        image_set, split = named.image_set, named.split
        if image_set.modality is not None and split is not None:
            labelled = format_set_name(image_set.domain, image_set.modality, True, split)
            unlabelled = format_set_name(image_set.domain, image_set.modality, False, split)
            parts.append(f"{named.label}: L = {labelled}, U = {unlabelled}")
    return "; ".join(parts)


def _overview_table(rows: list[tuple[NamedSet, dict[str, Any]]]) -> Table:
    table = Table(
        title="Data sets (cf. Table 1 of Kenneweg, Stallmann, Hammer 2023)",
        caption=_paper_names(rows) or None,
    )
    for header in ("Set", "Images", "L", "U", "Counts", "Chambers", "Mean grey"):
        table.add_column(header, justify="left" if header == "Set" else "right")
    for named, summary in rows:
        count_range = (
            f"{summary['count_min']}..{summary['count_max']}" if summary["labelled"] else "-"
        )
        chambers = summary["chambers"]
        table.add_row(
            named.label,
            str(summary["images"]),
            str(summary["labelled"]),
            str(summary["unlabelled"]),
            count_range,
            "-" if chambers is None else str(chambers),
            f"{summary['mean_grey']:.3f}",
        )
    return table


def _histogram_table(rows: list[tuple[NamedSet, dict[str, Any]]]) -> Table | None:
    labelled = [(named, summary) for named, summary in rows if summary["labelled"]]
    if not labelled:
        return None
    top = max(summary["count_max"] for _, summary in labelled)
    width = max(1, math.ceil(top / _MAX_HISTOGRAM_ROWS))
    table = Table(title="Labelled images per cell count", box=None)
    table.add_column("Cells", justify="right")
    binned: list[list[int]] = []
    for named, summary in labelled:
        table.add_column(named.label)
        bins = [0] * math.ceil(top / width)
        for count, frequency in summary["histogram"].items():
            bins[(count - 1) // width] += frequency
        binned.append(bins)
    for index in range(math.ceil(top / width)):
        low, high = index * width + 1, min(top, (index + 1) * width)
        cells = [str(low) if low == high else f"{low}-{high}"]
        for bins in binned:
            scale = _BAR_WIDTH / max(max(bins), 1)
            cells.append(f"[cyan]{'█' * round(bins[index] * scale)}[/] {bins[index]}")
        table.add_row(*cells)
    return table


@data_app.command("info")
def info(
    path: Path = typer.Argument(
        ...,
        help="A CHO-K1 folder (holding bf/ and pc/), a modality folder (train.csv, test.csv), "
        "a CHO-K1 CSV file, or a folder of images with an optional counts.csv.",
    ),
    split: SplitChoice = typer.Option(
        SplitChoice.all,
        "--split",
        help="Which CHO-K1 split to read (ignored for a generic folder).",
    ),
    modality: ModalityChoice = typer.Option(
        ModalityChoice.all, "--modality", help="Which modality of a CHO-K1 root folder to read."
    ),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Skip (and list) bad rows and images instead of stopping."
    ),
    resize: bool = typer.Option(
        False, "--resize", help="Resize images that are not 128x128 instead of stopping."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print the numbers as JSON instead of tables."
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Folder for the decoded-image cache (.npz); default: no cache."
    ),
) -> None:
    """Show images, labelled (L) / unlabelled (U) counts, count range, chambers and grey mean."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedInputWarning)
        sets = load_splits(
            path,
            split=split.value,
            modality=modality.value,
            skip_bad=skip_bad,
            resize=resize,
            cache_dir=cache,
            progress=not json_output,
        )
    for warning in caught:
        if issubclass(warning.category, SkippedInputWarning):
            err_console.print(Text("Warning: ", style="yellow") + Text(str(warning.message)))
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    rows = [(named, summarize(named.image_set)) for named in sets]
    if json_output:
        payload = {named.label: {**summary, "split": named.split} for named, summary in rows}
        typer.echo(json.dumps(payload, indent=2))
        return
    console.print(_overview_table(rows))
    histogram = _histogram_table(rows)
    if histogram is not None:
        console.print(histogram)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.add_typer(data_app, name="data")
