"""CLI commands: experiment (run a plan), report (RESULTS.md), watershed (classical baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from twinvae.cli.common import OVERRIDE_METAVAR, console, make_progress
from twinvae.errors import ConfigError, DataError, TwinVAEError

watershed_app = typer.Typer(
    help="The classical watershed counter (scikit-image): tune on the validation split, evaluate.",
    no_args_is_help=True,
)

PLAN_HELP = (
    "Plan YAML file, or the name of a builtin plan (see docs/experiments.md), e.g. paper-table2."
)
EMBEDDING_HELP = "2-D embedding of the latent space figure: umap (needs umap-learn) or pca."


def _log(message: str) -> None:
    console.print(escape(message), highlight=False)


def experiment_command(
    plan: str = typer.Argument(..., help=PLAN_HELP),
    only: list[str] = typer.Option(
        [],
        "--only",
        metavar="ROW",
        help="Run only this row (and the rows it transfers from); repeatable.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show the order and what each row would do; run nothing."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Output folder, one subfolder per row (default: runs/<plan name>).",
    ),
    data_root: str | None = typer.Option(
        None,
        "--data-root",
        help="CHO-K1 folder holding bf/ and pc/ (default: the plan's data_root, else "
        "$TWINVAE_CHO_K1).",
    ),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        "-s",
        metavar=OVERRIDE_METAVAR,
        help="Override a config value in every train/transfer row, e.g. --set train.epochs=2.",
    ),
    report: bool = typer.Option(
        True, "--report/--no-report", help="Write RESULTS.md, results.json and figures into --out."
    ),
    embedding: str = typer.Option("umap", "--embedding", help=EMBEDDING_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    keep_going: bool = typer.Option(
        False,
        "--keep-going",
        help="When a row fails, go on with the rows that do not depend on it (exit code 1).",
    ),
) -> None:
    """Train, transfer, export and evaluate the rows of an experiment plan (resumable)."""
    from twinvae.experiments.plan import load_plan
    from twinvae.experiments.report import build_report
    from twinvae.experiments.runner import run_plan

    if embedding not in ("umap", "pca"):
        raise ConfigError(f"--embedding {embedding!r}: expected umap or pca")
    loaded = load_plan(plan)
    target = out or Path("runs") / loaded.name
    outcomes = run_plan(
        loaded,
        target,
        only=only or None,
        dry_run=dry_run,
        data_root=data_root,
        overrides=overrides,
        progress=progress,
        log=_log,
        plan_argument=plan,
        keep_going=keep_going,
    )
    table = Table(title=f"plan {loaded.name} -> {target}" + (" (dry run)" if dry_run else ""))
    table.add_column("row")
    table.add_column("done" if not dry_run else "would do")
    table.add_column("results")
    for outcome in outcomes:
        table.add_row(outcome.name, "; ".join(outcome.actions), str(outcome.results or "-"))
    console.print(table)
    finished = any(o.results is not None for o in outcomes)
    if report and not dry_run and finished:
        result = build_report(target, target, embedding=embedding, log=_log)  # type: ignore[arg-type]
        console.print(f"report: {result.markdown}")
    failed = [o.name for o in outcomes if o.failed]
    if failed:
        raise TwinVAEError(f"{len(failed)} row(s) did not finish: {', '.join(failed)} (see above)")


def report_command(
    results_dir: Path = typer.Argument(..., help="Output folder of `twinvae experiment`."),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Folder for RESULTS.md, results.json and figures/ (e.g. model_zoo).",
    ),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw the PNG figures."),
    embedding: str = typer.Option("umap", "--embedding", help=EMBEDDING_HELP),
    notes: Path | None = typer.Option(
        None, "--notes", help="Markdown file included as the Discussion section."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace RESULTS.md / results.json not written by this command."
    ),
) -> None:
    """Write RESULTS.md (beside the paper's Table 2), results.json and figures from row results."""
    from twinvae.experiments.report import build_report

    if embedding not in ("umap", "pca"):
        raise ConfigError(f"--embedding {embedding!r}: expected umap or pca")
    result = build_report(
        results_dir,
        out,
        figures=figures,
        embedding=embedding,  # type: ignore[arg-type]
        notes=notes,
        overwrite=overwrite,
        log=_log,
    )
    console.print(
        f"{result.rows} row(s): {result.markdown}, {result.results}, "
        f"{len(result.figures)} figure(s)"
    )


@watershed_app.command("tune")
def watershed_tune_command(
    out: Path = typer.Option(..., "--out", "-o", help="JSON file for the tuned parameters."),
    modality: str = typer.Option(..., "--modality", "-m", help="bf or pc."),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="CHO-K1 folder holding bf/ and pc/ (default: $TWINVAE_CHO_K1)."
    ),
    grid: Path | None = typer.Option(
        None, "--grid", help="JSON object parameter -> list of values (default: builtin grid)."
    ),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Labelled share of validation."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the chamber split."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Grid-search the watershed parameters on the chamber-based validation split of train."""
    from twinvae.data.cho_k1 import cho_k1_root
    from twinvae.experiments import baselines

    if modality not in ("bf", "pc"):
        raise ConfigError(f"--modality {modality!r}: expected bf or pc")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
    chosen = baselines.default_grid(modality) if grid is None else baselines.load_grid(grid)  # type: ignore[arg-type]
    candidates = baselines.expand_grid(chosen)
    root = cho_k1_root(data_root)
    validation = baselines.validation_set(root, modality, val_fraction, split_seed)  # type: ignore[arg-type]
    with make_progress() as bar:
        task = bar.add_task("tuning", total=len(candidates))
        result = baselines.tune_watershed(
            validation.images,
            validation.counts,
            candidates,
            progress=lambda done, _total: bar.update(task, completed=done),
        )
    baselines.save_params(
        out,
        result,
        modality=modality,  # type: ignore[arg-type]
        grid=chosen,
        tuned_on={
            "data": validation.source,
            "data_root": str(root),
            "split": f"chamber-based validation split of train (val_fraction {val_fraction}, "
            f"split_seed {split_seed})",
            "images": len(validation),
        },
        overwrite=overwrite,
    )
    console.print(
        f"best of {len(candidates)} on {len(validation)} validation images: MAE {result.mae:.3f}, "
        f"accuracy {100 * result.accuracy:.1f} %; parameters written to {out}"
    )


@watershed_app.command("evaluate")
def watershed_evaluate_command(
    params: Path = typer.Argument(..., help="Parameter JSON written by `twinvae watershed tune`."),
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Labelled images: a set name such as Nat-PC-L-Te (with --data-root), a CSV file or "
        "a folder with counts.csv.",
    ),
    split: str = typer.Option(
        "test", "--split", help="train or test, for CHO-K1 modality folders."
    ),
    data_root: Path | None = typer.Option(
        None,
        "--data-root",
        help="Folder with bf/ and pc/, for set names (default: $TWINVAE_CHO_K1).",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report as JSON."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Allow replacing an existing --json file."
    ),
) -> None:
    """MAE, MRE and accuracy of the watershed counter on labelled images."""
    from twinvae.experiments.baselines import watershed_report

    if json_out is not None and json_out.exists() and not overwrite:
        raise DataError(f"{json_out}: exists; pass --overwrite to replace it")
    image_set = _load_set(data, split, data_root)
    report = watershed_report(params, image_set)
    overall = report["overall"]
    console.print(
        f"{int(overall['n'])} images: MAE {overall['mae']:.3f}, MRE {100 * overall['mre']:.2f} %, "
        f"accuracy {100 * overall['accuracy']:.1f} %"
    )
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        console.print(f"report written to {json_out}")


def _load_set(data: str, split: str, data_root: Path | None):  # type: ignore[no-untyped-def]
    from twinvae.data.readers import load_image_set
    from twinvae.data.setnames import resolve_set_name

    if Path(data).exists():
        return load_image_set(Path(data), split=split)  # type: ignore[arg-type]
    if data.count("-") == 3:
        return resolve_set_name(data, data_root)
    raise DataError(f"--data {data}: no such file or folder, and not a set name like Nat-PC-L-Te")


def register(app: typer.Typer) -> None:
    """Add experiment, report, watershed and protocol to the main app."""
    from twinvae.cli.protocol import protocol_app

    app.command("experiment", help=experiment_command.__doc__)(experiment_command)
    app.command("report", help=report_command.__doc__)(report_command)
    app.add_typer(watershed_app, name="watershed")
    app.add_typer(protocol_app, name="protocol")
