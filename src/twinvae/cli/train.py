"""CLI commands: train, transfer, evaluate."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from twinvae.cli.common import console
from twinvae.config import ExperimentConfig, builtin_configs, load_config
from twinvae.data.imageset import ImageSet
from twinvae.data.readers import Split
from twinvae.errors import ConfigError, DataError

STRATEGIES = ["simultaneous", "frozen-outer", "frozen-core", "thaw"]

CONFIG_HELP = (
    "YAML config file, or the name of a builtin config: paper-pc, paper-bf, transfer-pc-to-bf, "
    "double-transfer, quick-cpu."
)
SET_HELP = (
    "Override one config value, e.g. --set train.epochs=5 --set data.natural=path (repeatable)."
)


def _default_run_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _print_result_table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for column in ("epoch", "loss", "val_mae", "val_mre", "val_accuracy", "images_per_second"):
        table.add_column(column, justify="right")
    for row in rows[-10:]:
        table.add_row(
            *(
                _fmt(row.get(c, ""))
                for c in (
                    "epoch",
                    "loss",
                    "val_mae",
                    "val_mre",
                    "val_accuracy",
                    "images_per_second",
                )
            )
        )
    console.print(table)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def train_command(
    config: str = typer.Option("quick-cpu", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run folder to create (default: runs/<name>-<date>-<time>)."
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        help="Continue the run in this folder from its last.pt (config is taken from the run).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a Twin-VAE; the run folder gets config.yaml, metrics.csv, last.pt and best.pt."""
    from twinvae.training.trainer import train

    if resume is not None:
        if overrides:
            raise ConfigError("--set cannot be combined with --resume (the run's config is used)")
        result = train(ExperimentConfig(), resume, resume=True, progress=progress)
    else:
        cfg = load_config(config, overrides)
        result = train(cfg, out or _default_run_dir(cfg), progress=progress)
    _print_result_table(result.history, f"run {result.run_dir}")
    console.print(
        f"best validation MAE {result.best_val_mae:.3f} at epoch {result.best_epoch}; "
        f"checkpoints in {result.run_dir}" + (" (stopped early)" if result.stopped_early else "")
    )


def transfer_command(
    source: Path = typer.Option(
        ..., "--from", help="Checkpoint (best.pt / last.pt) or run folder to start from."
    ),
    config: str = typer.Option("transfer-pc-to-bf", "--config", "-c", help=CONFIG_HELP),
    strategy: str | None = typer.Option(
        None,
        "--strategy",
        help=f"Transfer strategy: {', '.join(STRATEGIES)} (default: from the config).",
    ),
    overrides: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    no_decoder: bool = typer.Option(
        False, "--no-decoder", help="Switch the decoders off (C_rec = 0, section 4.1)."
    ),
    natural_only: bool = typer.Option(
        False, "--natural-only", help="Train without the synthetic twin."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder to create."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Transfer a trained Twin-VAE to new data (e.g. another microscope)."""
    from twinvae.training.runner import run_transfer

    if strategy is not None and strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    extra = list(overrides)
    if strategy is not None:
        extra.append(f"transfer.strategy={strategy}")
    if no_decoder:
        extra.append("loss.decoder_off=true")
    if natural_only:
        extra.append("data.natural_only=true")
    cfg = load_config(config, extra)
    results = run_transfer(cfg, source, out or _default_run_dir(cfg), progress=progress)
    for result in results:
        _print_result_table(result.history, f"run {result.run_dir}")
        console.print(
            f"best validation MAE {result.best_val_mae:.3f}; checkpoints in {result.run_dir}"
        )


def evaluate_command(
    model: Path = typer.Argument(..., help="Checkpoint, run folder, or bioimage.io bundle (.zip)."),
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Labelled images: a CHO-K1 modality folder (with --split), a CSV file, a folder with "
        "counts.csv, or a paper set name such as Nat-PC-L-Te (then --data-root is used).",
    ),
    split: Split = typer.Option(
        "test", "--split", help="train or test, for CHO-K1 modality folders."
    ),
    data_root: Path = typer.Option(
        Path("../shared/data/cho-k1"),
        "--data-root",
        help="Folder with bf/ and pc/, for paper set names.",
    ),
    tta: bool = typer.Option(
        False, "--tta", help="Average the 8 flips/rotations (checkpoints only)."
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Write the full report (with per-count metrics) as JSON."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Allow replacing an existing --json file."
    ),
) -> None:
    """MAE, MRE and exact-count accuracy of a model on labelled images, overall and per count."""
    from twinvae.evaluation.evaluate import evaluate

    if json_out is not None and json_out.exists() and not overwrite:
        raise DataError(f"{json_out}: exists; pass --overwrite to replace it")
    image_set = _load_eval_set(data, split, data_root)
    report = evaluate(model, image_set, tta=tta)
    overall = report["overall"]
    table = Table(title=f"{model} on {data}")
    for column in ("images", "MAE", "MRE %", "accuracy %"):
        table.add_column(column, justify="right")
    table.add_row(
        str(int(overall["n"])),
        f"{overall['mae']:.3f}",
        f"{100 * overall['mre']:.2f}",
        f"{100 * overall['accuracy']:.1f}",
    )
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        console.print(f"report written to {json_out}")


def _load_eval_set(data: str, split: Split, data_root: Path) -> ImageSet:
    from twinvae.data.readers import load_image_set
    from twinvae.data.setnames import resolve_set_name

    if Path(data).exists():
        return load_image_set(Path(data), split=split, progress=True)
    if data.count("-") == 3:
        return resolve_set_name(data, data_root, progress=True)
    raise DataError(f"--data {data}: no such file or folder, and not a set name like Nat-PC-L-Te")


def register(app: typer.Typer) -> None:
    """Add train, transfer and evaluate to the main app."""
    app.command("train", help=train_command.__doc__)(train_command)
    app.command("transfer", help=transfer_command.__doc__)(transfer_command)
    app.command("evaluate", help=evaluate_command.__doc__)(evaluate_command)


__all__ = ["builtin_configs", "register"]
