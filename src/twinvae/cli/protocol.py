"""CLI commands: `twinvae protocol paper-split | chamber-cv | anchored | folds | summary |
report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from twinvae.cli.common import OVERRIDE_METAVAR, console
from twinvae.errors import ConfigError

protocol_app = typer.Typer(
    help="Evaluation protocols: paper-split (the authors' split, comparable with the paper), "
    "chamber-cv (cross-validation by chamber: the number for new chambers) and anchored "
    "(the authors' split, labelled training frames of the same chamber usable); summary and "
    "report (RESULTS.md) of their results. See docs/experiments.md.",
    no_args_is_help=True,
)

METHOD_HELP = (
    "predict-training-mean, nearest-label and interpolate-label (anchored only), watershed, "
    "a single-stage training config (builtin name such as cnn-baseline-pc, or a YAML file), "
    "which is trained, exported and evaluated through its bundle, or bundle:PATH, a finished "
    "bundle evaluated as it is (paper-split and anchored only; e.g. one built by `twinvae zoo "
    "build`)."
)
OUT_HELP = "Results folder: OUT/<protocol>/<modality>/<method>/<fold-K|split>/result.json."


def _log(message: str) -> None:
    console.print(escape(message), highlight=False)


def _run(
    protocol: str,
    method: str,
    modality: str | None,
    out: Path,
    data_root: Path | None,
    overrides: list[str],
    folds: list[int] | None,
    folds_file: Path | None,
    dry_run: bool,
    progress: bool,
) -> None:
    from twinvae.data.cho_k1 import cho_k1_root
    from twinvae.protocols.folds import fold_file_path, load_folds
    from twinvae.protocols.runner import ProtocolRun, resolve_method, run_protocol

    chosen = resolve_method(method, modality)
    root = cho_k1_root(data_root, needed_for=f"twinvae protocol {protocol}")
    run = ProtocolRun(out, str(root), list(overrides), progress, _log)
    if protocol == "chamber-cv":
        run.fold_file_path = folds_file or fold_file_path(chosen.modality)
        run.fold_file = load_folds(run.fold_file_path)
    outcomes = run_protocol(protocol, chosen, run, folds=folds, dry_run=dry_run)  # type: ignore[arg-type]
    done = [o for o in outcomes if o.result is not None]
    if not dry_run:
        console.print(f"{len(done)} result(s) in {out}; `twinvae protocol summary {out}` sums up")


_OVERRIDES = typer.Option(
    [],
    "--set",
    "-s",
    metavar=OVERRIDE_METAVAR,
    help="Override a config value of a training method, e.g. train.epochs=2.",
)
_MODALITY = typer.Option(
    None,
    "--modality",
    "-m",
    help="bf or pc (rules and watershed; a config or a twinvae bundle has its own).",
)
_DATA_ROOT = typer.Option(
    None, "--data-root", help="CHO-K1 folder holding bf/ and pc/ (default: $TWINVAE_CHO_K1)."
)
_DRY_RUN = typer.Option(False, "--dry-run", help="Say what would run; run nothing.")
_PROGRESS = typer.Option(True, "--progress/--no-progress", help="Training progress bars.")


@protocol_app.command("paper-split")
def paper_split_command(
    method: str = typer.Option(..., "--method", help=METHOD_HELP),
    out: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
    modality: str | None = _MODALITY,
    data_root: Path | None = _DATA_ROOT,
    overrides: list[str] = _OVERRIDES,
    dry_run: bool = _DRY_RUN,
    progress: bool = _PROGRESS,
) -> None:
    """Train on train.csv, evaluate on the labelled frames of test.csv (the paper's split)."""
    _run("paper-split", method, modality, out, data_root, overrides, None, None, dry_run, progress)


@protocol_app.command("chamber-cv")
def chamber_cv_command(
    method: str = typer.Option(..., "--method", help=METHOD_HELP),
    out: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
    fold: list[int] = typer.Option(
        [],
        "--fold",
        "-f",
        metavar="K",
        help="Run only this fold (repeatable; default: every fold).",
    ),
    modality: str | None = _MODALITY,
    folds_file: Path | None = typer.Option(
        None,
        "--folds-file",
        help="Fold file (default: the committed src/twinvae/configs/folds/cho-k1-<modality>.yaml).",
    ),
    data_root: Path | None = _DATA_ROOT,
    overrides: list[str] = _OVERRIDES,
    dry_run: bool = _DRY_RUN,
    progress: bool = _PROGRESS,
) -> None:
    """Cross-validation by chamber: train on the fold's other chambers (validation cut by
    chamber from them), evaluate on its held-out chambers. Resumable."""
    _run(
        "chamber-cv",
        method,
        modality,
        out,
        data_root,
        overrides,
        list(fold) or None,
        folds_file,
        dry_run,
        progress,
    )


@protocol_app.command("anchored")
def anchored_command(
    method: str = typer.Option(..., "--method", help=METHOD_HELP),
    out: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
    modality: str | None = _MODALITY,
    data_root: Path | None = _DATA_ROOT,
    overrides: list[str] = _OVERRIDES,
    dry_run: bool = _DRY_RUN,
    progress: bool = _PROGRESS,
) -> None:
    """The paper's split where the labelled training frames of the same chamber may be used at
    prediction time (image-only models reuse their paper-split run)."""
    _run("anchored", method, modality, out, data_root, overrides, None, None, dry_run, progress)


@protocol_app.command("folds")
def folds_command(
    modality: str = typer.Option(..., "--modality", "-m", help="bf or pc."),
    data_root: Path | None = _DATA_ROOT,
    n_folds: int = typer.Option(4, "--folds", help="Number of folds (with --write)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the assignment (with --write)."),
    write: Path | None = typer.Option(
        None, "--write", help="Make a new fold file from the data and write it here."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --write file."),
) -> None:
    """Show the committed chamber folds of a modality and check them against the data (or make
    a new fold file with --write)."""
    from twinvae.data.cho_k1 import cho_k1_root
    from twinvae.protocols.folds import (
        check_frames,
        fold_file_path,
        fold_file_text,
        list_frames,
        load_folds,
        make_fold_file,
    )

    if modality not in ("bf", "pc"):
        raise ConfigError(f"--modality {modality!r}: expected bf or pc")
    root = cho_k1_root(data_root, needed_for="twinvae protocol folds")
    frames = list_frames(root, modality)  # type: ignore[arg-type]
    if write is not None:
        if write.exists() and not overwrite:
            raise ConfigError(f"{write}: exists; pass --overwrite to replace it")
        made = make_fold_file(frames, modality, n_folds, seed)  # type: ignore[arg-type]
        write.parent.mkdir(parents=True, exist_ok=True)
        write.write_text(fold_file_text(made), encoding="utf-8")
        console.print(f"fold file written to {write}")
        fold_file, source = made, write
    else:
        source = fold_file_path(modality)  # type: ignore[arg-type]
        fold_file = load_folds(source)
        check_frames(fold_file, frames, str(root / modality))
    table = Table(title=f"{source}: {len(fold_file.folds)} folds (seed {fold_file.seed})")
    for column in ("fold", "held-out chambers", "images", "labelled", "counts"):
        table.add_column(column)
    for index, chambers in enumerate(fold_file.folds):
        stats = [fold_file.chambers[c] for c in chambers]
        low = min((s.min_count for s in stats if s.min_count is not None), default=None)
        high = max((s.max_count for s in stats if s.max_count is not None), default=None)
        table.add_row(
            str(index),
            ", ".join(chambers),
            str(sum(s.images for s in stats)),
            str(sum(s.labelled for s in stats)),
            f"{low}-{high}",
        )
    console.print(table)
    console.print("every chamber of the data is in exactly one fold")


def _cell(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 3) -> str:
    if mean is None:
        return "-"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


@protocol_app.command("summary")
def summary_command(
    results: Path = typer.Argument(..., help="The --out folder of the protocol commands."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the summary as JSON."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
) -> None:
    """Mean ± standard deviation over folds, every fold's numbers and the pooled held-out
    images, per protocol, modality and method (MAE, MRE, accuracy: the paper's definitions)."""
    from twinvae.protocols.summary import summary_payload

    if json_out is not None and json_out.exists() and not overwrite:
        raise ConfigError(f"{json_out}: exists; pass --overwrite to replace it")
    payload = summary_payload(results)
    tables: dict[tuple[str, str], Table] = {}
    for entry in payload["entries"]:
        key = (entry["protocol"], entry["modality"])
        if key not in tables:
            tables[key] = Table(title=f"{entry['protocol']}, {entry['modality'].upper()}")
            for column in SUMMARY_COLUMNS:
                tables[key].add_column(column, justify="left" if column == "method" else "right")
        table = tables[key]
        mean, std = entry["mean"], entry["std"]
        if entry["folds"] is None:
            folds = "split"
        else:
            folds = f"mean ± sd of {len(entry['folds_done'])}"
            if not entry["complete"]:
                folds += f" (of {entry['folds']})"
        table.add_row(
            entry["method"],
            folds,
            str(entry["pooled"]["overall"]["n"]),
            *_metric_cells(mean, std),
            _growth_cell(entry["pooled"]["growth"]),
        )
        if entry["folds"] is None:
            continue
        for fold in entry["per_fold"]:
            table.add_row(
                "",
                f"fold {fold['fold']}",
                str(fold["n"]),
                *_metric_cells(fold, {}),
                _growth_cell(fold["growth"]),
            )
    for table in tables.values():
        console.print(table)
    console.print(
        "Growth: relative error of each held-out chamber's growth rate (log-linear fit over its "
        "labelled frames), predictions against labels; cross-validation rows pool the chambers "
        "of all folds."
    )
    if json_out is not None:
        json_out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        console.print(f"summary written to {json_out}")


@protocol_app.command("report")
def report_command(
    results: Path = typer.Argument(
        ..., help="The --out folder of the protocol commands (or OUT/results, the copies)."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Folder for RESULTS.md, results.json, figures/ and results/ (e.g. model_zoo).",
    ),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw the PNG figures."),
    notes: Path | None = typer.Option(
        None, "--notes", help="Markdown file appended after the Notes section."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace RESULTS.md / results.json no report command wrote."
    ),
) -> None:
    """RESULTS.md from the protocol results: per modality a table per protocol (chamber-cv
    first, paper-split beside the paper's Table 2, anchored), figures, and the command of
    every number. The result files are copied into OUT/results/ first (machine paths made
    relative), so that `twinvae protocol report OUT/results --out OUT` makes it again."""
    from twinvae.protocols.report import build_protocol_report

    report = build_protocol_report(
        results, out, figures=figures, notes=notes, overwrite=overwrite, log=_log
    )
    console.print(
        f"{report.results} result(s): {report.markdown}, {report.summary}, "
        f"{len(report.figures)} figure(s)"
    )
    for line in report.incomplete:
        console.print(f"incomplete: {escape(line)}")


SUMMARY_COLUMNS = (
    "method",
    "fold",
    "images",
    "MAE",
    "MRE %",
    "acc. %",
    "±1 %",
    "MAE unr.",
    "slope",
    "growth err. med/max",
)


def _metric_cells(values: dict[str, Any], spread: dict[str, Any]) -> list[str]:
    """MAE, MRE, accuracy, within one, unrounded MAE and slope (with ± sd where given)."""
    scales = (("mae", 1, 3), ("mre", 100, 1), ("accuracy", 100, 1), ("within_one", 100, 1))
    cells = [_cell(values[k], spread.get(k), scale, digits) for k, scale, digits in scales]
    cells.append(_cell(values["mae_unrounded"], spread.get("mae_unrounded")))
    cells.append(_cell(values["slope"], spread.get("slope"), digits=2))
    return cells


def _growth_cell(growth: dict[str, float | None]) -> str:
    median, worst = growth.get("median_relative_error"), growth.get("worst_relative_error")
    if median is None or worst is None:
        return "-"
    return f"{100 * median:.0f} % / {100 * worst:.0f} %"
