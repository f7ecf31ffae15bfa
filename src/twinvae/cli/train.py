"""CLI commands: train, transfer, evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from twinvae.cli.common import OVERRIDE_METAVAR, console, name_list_help
from twinvae.config import ExperimentConfig, builtin_configs, load_config
from twinvae.data.imageset import ImageSet
from twinvae.data.readers import Split
from twinvae.errors import ConfigError, DataError

if TYPE_CHECKING:
    from twinvae.training.trainer import TrainResult

STRATEGIES = ["simultaneous", "frozen-outer", "frozen-core", "thaw"]

CONFIG_HELP = "Builtin config (listed below) or YAML config file."
CONFIG_METAVAR = "NAME|FILE"
# Below the options of train and transfer: every config shipped in twinvae/configs/.
BUILTIN_CONFIGS_HELP = name_list_help("Builtin configs:", builtin_configs())
SET_HELP = (
    "Override one config value, e.g. --set train.epochs=5 --set data.natural=path (repeatable)."
)
DATA_ROOT_HELP = (
    "CHO-K1 folder holding bf/ and pc/, where the cho-k1:... paths of configs point "
    "(default: $TWINVAE_CHO_K1)."
)
SKIP_BAD_HELP = "Skip (and list) unreadable images and bad CSV rows instead of stopping."


def _default_run_dir(config: ExperimentConfig) -> Path:
    from twinvae.training.run_dir import default_run_dir

    return default_run_dir(config.name)


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


def _epochs(count: int) -> str:
    return f"{count} epoch" if count == 1 else f"{count} epochs"


def _complete_message(result: TrainResult) -> str:
    how = "stopped early" if result.stopped_early else "all epochs done"
    longer = (
        "--set train.early_stopping_patience=N"
        if result.stopped_early
        else f"--set train.epochs=N (N > {result.epochs_run})"
    )
    return (
        f"{result.run_dir}: run already complete after {_epochs(result.epochs_run)} ({how}); "
        f"nothing to train. Best validation MAE {result.best_val_mae:.3f} at epoch "
        f"{result.best_epoch}. To train on: twinvae train --resume {result.run_dir} {longer}"
    )


def _skip_bad_inputs(config: ExperimentConfig) -> None:
    """--skip-bad: data.skip_bad in every stage of the run (also a double transfer's second)."""
    config.data.skip_bad = True
    second = config.transfer.second_stage if config.transfer is not None else None
    if second is not None:
        second.data.skip_bad = True


def train_command(
    config: str = typer.Option(
        "quick-cpu", "--config", "-c", metavar=CONFIG_METAVAR, help=CONFIG_HELP
    ),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar=OVERRIDE_METAVAR, help=SET_HELP),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Run folder to create (default: a new runs/<name>-<date>-<time>-<4 hex digits>).",
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        help="Continue the run in this folder from its last.pt with the run's config; only "
        "--set train.epochs=N (to train longer) and train.early_stopping_patience may change.",
    ),
    data_root: Path | None = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP + " Sets data.skip_bad."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a Twin-VAE; the run folder gets config.yaml, metrics.csv, last.pt and best.pt."""
    from twinvae.training.trainer import train

    if resume is not None:
        if skip_bad:
            raise ConfigError(
                "--skip-bad cannot be combined with --resume (the run's config is used)"
            )
        result = train(None, resume, resume=True, resume_overrides=overrides, progress=progress)
        if result.already_complete:
            console.print(_complete_message(result), soft_wrap=True)
            return
    else:
        cfg = load_config(config, overrides, data_root=data_root)
        if skip_bad:
            _skip_bad_inputs(cfg)
        result = train(cfg, out or _default_run_dir(cfg), progress=progress)
    _print_result_table(result.history, f"run {result.run_dir}")
    console.print(
        f"best validation MAE {result.best_val_mae:.3f} at epoch {result.best_epoch}; "
        f"checkpoints in {result.run_dir}" + (" (stopped early)" if result.stopped_early else "")
    )


def transfer_command(
    source: str = typer.Option(
        ...,
        "--from",
        metavar="RUN|CHECKPOINT|BUNDLE|ZOO-NAME",
        help="Where to start: a run folder or checkpoint (best.pt / last.pt), a bioimage.io "
        "bundle (.zip from twinvae export or zoo build), or a zoo model's name (twinvae zoo "
        "list). Bundles exported before they attached twinvae_weights.safetensors, and zoo "
        "models listed as 'counting path only', hold no synthetic encoder and no decoders: "
        "from them only --natural-only runs (strategy simultaneous or thaw).",
    ),
    config: str = typer.Option(
        "transfer-pc-to-bf", "--config", "-c", metavar=CONFIG_METAVAR, help=CONFIG_HELP
    ),
    strategy: str | None = typer.Option(
        None,
        "--strategy",
        help=f"Transfer strategy: {', '.join(STRATEGIES)} (default: from the config).",
    ),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar=OVERRIDE_METAVAR, help=SET_HELP),
    no_decoder: bool = typer.Option(
        False, "--no-decoder", help="Switch the decoders off (C_rec = 0, section 4.1)."
    ),
    natural_only: bool = typer.Option(
        False,
        "--natural-only",
        help="Train without the synthetic twin (needed for sources with only the counting path).",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder to create."),
    data_root: Path | None = typer.Option(None, "--data-root", help=DATA_ROOT_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP + " Sets data.skip_bad."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Transfer a trained Twin-VAE to new data (e.g. another microscope): from a run, a bundle
    or a zoo model. For a modality other than bf and pc set data.modality (a name, or other):
    the synthetic twin then uses the generator's bf or pc settings closest to the images (or
    data.synthetic_generator.modality)."""
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
    cfg = load_config(config, extra, data_root=data_root)
    if skip_bad:
        _skip_bad_inputs(cfg)
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
    data_root: Path | None = typer.Option(
        None,
        "--data-root",
        help="Folder with bf/ and pc/, for paper set names (default: $TWINVAE_CHO_K1).",
    ),
    skip_bad: bool = typer.Option(False, "--skip-bad", help=SKIP_BAD_HELP),
    resize: bool = typer.Option(
        False, "--resize", help="Rescale images that are not 128x128 instead of stopping."
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
    """MAE, MRE and accuracy of the rounded count (the papers' definitions) and diagnostics of a
    model on labelled images, overall, per count and per chamber over time (growth rates)."""
    from twinvae.evaluation.evaluate import evaluate

    if json_out is not None and json_out.exists() and not overwrite:
        raise DataError(f"{json_out}: exists; pass --overwrite to replace it")
    image_set = _load_eval_set(data, split, data_root, skip_bad=skip_bad, resize=resize)
    report = evaluate(model, image_set, tta=tta)
    overall = report["overall"]
    table = Table(title=f"{model} on {data}")
    columns = ("images", "MAE", "MRE %", "accuracy %", "within ±1 %", "MAE unrounded", "slope")
    for column in (*columns, "negative"):
        table.add_column(column, justify="right")
    slope = overall.get("slope")
    table.add_row(
        str(int(overall["n"])),
        f"{overall['mae']:.3f}",
        f"{100 * overall['mre']:.2f}",
        f"{100 * overall['accuracy']:.1f}",
        f"{100 * overall['within_one']:.1f}",
        f"{overall['mae_unrounded']:.3f}",
        "-" if slope is None else f"{slope:.2f}",
        str(overall["negative"]),
    )
    console.print(table)
    console.print(
        "MAE, MRE and accuracy of the rounded count (the papers' definitions); slope of the "
        "least-squares line of prediction on truth; negative = predictions below 0."
    )
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        console.print(f"report written to {json_out}")


def _load_eval_set(
    data: str, split: Split, data_root: Path | None, *, skip_bad: bool, resize: bool
) -> ImageSet:
    from twinvae.data.readers import load_image_set
    from twinvae.data.setnames import resolve_set_name

    options: dict[str, Any] = {"skip_bad": skip_bad, "resize": resize, "progress": True}
    if Path(data).exists():
        return load_image_set(Path(data), split=split, **options)
    if data.count("-") == 3:
        return resolve_set_name(data, data_root, **options)
    raise DataError(f"--data {data}: no such file or folder, and not a set name like Nat-PC-L-Te")


def register(app: typer.Typer) -> None:
    """Add train, transfer and evaluate to the main app."""
    app.command("train", help=train_command.__doc__, epilog=BUILTIN_CONFIGS_HELP)(train_command)
    app.command("transfer", help=transfer_command.__doc__, epilog=BUILTIN_CONFIGS_HELP)(
        transfer_command
    )
    app.command("evaluate", help=evaluate_command.__doc__)(evaluate_command)


__all__ = ["builtin_configs", "register"]
