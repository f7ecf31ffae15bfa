"""Run an experiment plan: train or transfer each row, export its bundle, evaluate the bundle.

Layout of the output folder (one folder per row)::

    OUT/<row>/run/          the training run (config.yaml, metrics.csv, last.pt, best.pt);
                            run/leg1 and run/leg2 for a config with a second transfer stage
    OUT/<row>/<row>.zip     the bioimage.io bundle exported from the best checkpoint
    OUT/<row>/eval/<set>.json   `twinvae evaluate ... --json` reports (bundle; .tta = checkpoint)
    OUT/<row>/results.json  metrics, commands, training time and hardware of the row
    OUT/<row>/watershed.json    watershed rows: the tuned parameters

Every step is idempotent: a finished row is skipped, an interrupted run resumes from last.pt,
a bundle is exported again only when best.pt changed, and a run whose config differs from the
plan's stops the runner with a message instead of being overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twinvae.config import ExperimentConfig, TransferConfig
from twinvae.data.imageset import ImageSet
from twinvae.data.setnames import parse_set_name
from twinvae.errors import CheckpointError, ConfigError, TwinVAEError
from twinvae.experiments.plan import (
    Modality,
    Plan,
    PlanRow,
    default_test_sets,
    execution_order,
    final_modality,
    plan_data_root,
    row_config,
)
from twinvae.fileio import atomic_writer, sha256_file

RESULT_FORMAT = "twinvae-experiment-row/1"
Log = Callable[[str], None]
_PATH_KEYS = (
    ("data", "natural"),
    ("data", "synthetic"),
    ("data", "cache_dir"),
    ("transfer", "from_checkpoint"),
)


def _quiet(_message: str) -> None:
    """The default log: say nothing."""


@dataclass
class RowPaths:
    """Where a row keeps its files."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def bundle(self) -> Path:
        return self.root / f"{self.root.name}.zip"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def export_record(self) -> Path:
        return self.root / "export.json"

    @property
    def source_record(self) -> Path:
        return self.root / "source.json"

    @property
    def watershed_params(self) -> Path:
        return self.root / "watershed.json"

    @property
    def watershed_grid(self) -> Path:
        return self.root / "watershed-grid.json"

    def stage_dirs(self, config: ExperimentConfig) -> list[Path]:
        """One run folder, or leg1/leg2 for a double transfer config."""
        if config.transfer is not None and config.transfer.second_stage is not None:
            return [self.run / "leg1", self.run / "leg2"]
        return [self.run]

    def best_checkpoint(self, config: ExperimentConfig) -> Path:
        return self.stage_dirs(config)[-1] / "best.pt"


@dataclass
class RowOutcome:
    """What the runner did (or, in a dry run, would do) for one row."""

    name: str
    actions: list[str]
    results: Path | None = None
    failed: bool = False


@dataclass
class RunContext:
    """Options of one `run_plan` call plus caches shared by its rows."""

    plan: Plan
    out: Path
    data_root: str
    overrides: list[str]
    progress: bool
    log: Log
    plan_argument: str
    image_sets: dict[str, ImageSet] = field(default_factory=dict)

    def row_paths(self, name: str) -> RowPaths:
        return RowPaths(self.out / name)

    def image_set(self, name: str) -> ImageSet:
        """A Table 1 set, exactly as `twinvae evaluate --data NAME` resolves it."""
        if name not in self.image_sets:
            from twinvae.data.setnames import resolve_set_name

            self.image_sets[name] = resolve_set_name(name, self.data_root)
        return self.image_sets[name]


# --- small helpers ---------------------------------------------------------------------------


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON via a temporary file and rename, so a kill never leaves half a file."""
    with atomic_writer(path) as stream:
        stream.write(json.dumps(payload, indent=2))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def hardware_info() -> dict[str, Any]:
    """CPU model, cores, torch version and device of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def metrics_seconds(metrics_csv: Path) -> tuple[float, int]:
    """Training seconds (sum of the `seconds` column) and epochs of a run's metrics.csv."""
    if not metrics_csv.is_file():
        return 0.0, 0
    with metrics_csv.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    seconds = sum(float(row["seconds"]) for row in rows if row.get("seconds"))
    return seconds, len(rows)


def _normalised(config: ExperimentConfig) -> dict[str, Any]:
    """The config as a dict with its file paths made absolute, for comparisons."""
    data = config.model_dump(mode="json")

    def fix(node: dict[str, Any] | None) -> None:
        if not isinstance(node, dict):
            return
        for section, key in _PATH_KEYS:
            part = node.get(section)
            if isinstance(part, dict) and isinstance(part.get(key), str):
                part[key] = str(Path(part[key]).resolve())

    fix(data)
    second = (data.get("transfer") or {}).get("second_stage")
    if isinstance(second, dict):
        fix({"data": second.get("data")})
    return data


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def config_differences(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """Keys whose values differ, as "key: a-value != b-value"."""
    left, right = _flatten(_normalised(a)), _flatten(_normalised(b))
    return [
        f"{key}: {left.get(key)!r} != {right.get(key)!r}"
        for key in sorted(set(left) | set(right))
        if left.get(key) != right.get(key)
    ]


def training_complete(checkpoint: Any) -> bool:
    """A run is complete after its last epoch or when early stopping ended it."""
    train = checkpoint.config.train
    if checkpoint.epoch + 1 >= train.epochs:
        return True
    patience = train.early_stopping_patience
    waited = int(checkpoint.trainer_state.get("epochs_since_best", 0))
    return patience is not None and waited >= patience


def _fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _command(*parts: str | Path) -> str:
    return shlex.join(str(p) for p in parts)


def evaluate_command(
    model: Path | str, set_name: str, data_root: str, json_path: Path | str, *, tta: bool = False
) -> str:
    """The `twinvae evaluate` command line that writes exactly ``json_path``."""
    parts: list[str | Path] = ["twinvae", "evaluate", model, "--data", set_name]
    if parse_set_name(set_name).domain == "natural":
        parts += ["--data-root", data_root]
    if tta:
        parts.append("--tta")
    parts += ["--json", json_path, "--overwrite"]
    return _command(*parts)


# --- training --------------------------------------------------------------------------------


def _clear_unstarted(run_dir: Path, log: Log) -> None:
    """Remove what a run killed before its first checkpoint left behind (its own files only).

    A run that is still in its first epoch has no last.pt either: the folder's lock is taken
    first, so a folder another process is training in is refused, never emptied."""
    from twinvae.training.run_dir import LOCK_NAME, RunDirectory

    if not run_dir.is_dir():
        return
    holder = RunDirectory.locked(run_dir)  # raises RunDirectoryInUseError while in use
    try:
        # the lock file is the run folder's own (RunDirectory): never removed here
        leftovers = [p for p in run_dir.iterdir() if p.name != LOCK_NAME]
        ours = {"config.yaml", "metrics.csv"}
        foreign = [
            p.name
            for p in leftovers
            if p.name not in ours and not (p.name.startswith(".") and p.name.endswith(".tmp"))
        ]
        if foreign:
            raise ConfigError(
                f"{run_dir}: holds {', '.join(sorted(foreign))} but no last.pt; it is not a run "
                "this runner can resume. Move it away or choose another --out"
            )
        if leftovers:
            log(f"  removing the unfinished start of {run_dir} (no checkpoint was written)")
        for path in leftovers:
            path.unlink()
    finally:
        holder.close()


def train_stage(
    config: ExperimentConfig, run_dir: Path, *, progress: bool, log: Log, label: str
) -> None:
    """Train ``config`` into ``run_dir``: skip when complete, resume from last.pt, else start."""
    from twinvae.training.checkpoint import load_checkpoint
    from twinvae.training.trainer import train

    epochs = config.train.epochs
    last = run_dir / "last.pt"
    if last.is_file():
        checkpoint = load_checkpoint(last)
        differences = config_differences(checkpoint.config, config)
        if differences:
            shown = "; ".join(differences[:5]) + (" ..." if len(differences) > 5 else "")
            raise ConfigError(
                f"{run_dir} was trained with a different config than the plan asks for "
                f"(run != plan: {shown}). Delete that folder to start the row again, or run "
                "the plan into another --out"
            )
        if training_complete(checkpoint):
            log(f"  {label}: training complete ({checkpoint.epoch + 1} epochs), kept")
            return
        log(f"  {label}: resuming at epoch {checkpoint.epoch + 2}/{epochs} from {last}")
        train(config, run_dir, resume=True, progress=progress)
        return
    _clear_unstarted(run_dir, log)
    log(f"  {label}: training {epochs} epochs into {run_dir}")
    train(config, run_dir, progress=progress)


def stage_status(run_dir: Path, wanted: ExperimentConfig | None = None) -> str:
    """ "new run", "resume at epoch k/n", "complete (...)" or why the run cannot be used."""
    from twinvae.training.checkpoint import load_checkpoint

    last = run_dir / "last.pt"
    if not last.is_file():
        return "new run"
    checkpoint = load_checkpoint(last)
    differences = config_differences(checkpoint.config, wanted) if wanted is not None else []
    if differences:
        return (
            f"CONFLICT: trained with a different config (run != plan: {'; '.join(differences[:3])})"
        )
    if training_complete(checkpoint):
        return f"complete ({checkpoint.epoch + 1} epochs)"
    return f"resume at epoch {checkpoint.epoch + 2}/{checkpoint.config.train.epochs}"


def _transfer_config(config: ExperimentConfig, source: Path) -> ExperimentConfig:
    from twinvae.training.runner import transfer_config

    return transfer_config(config, source)


def second_leg_config(first: ExperimentConfig, leg1_best: Path) -> ExperimentConfig:
    """The second leg of a double transfer, built as `twinvae transfer` builds it."""
    from twinvae.training.runner import transfer_config

    assert first.transfer is not None and first.transfer.second_stage is not None
    second = first.transfer.second_stage
    config = first.model_copy(
        update={
            "data": second.data,
            "train": first.train.model_copy(update={"epochs": second.epochs}),
            "transfer": TransferConfig(strategy=second.strategy),
        }
    )
    return transfer_config(config, leg1_best)


# --- rows ------------------------------------------------------------------------------------


def _source_checkpoint(ctx: RunContext, row: PlanRow) -> Path:
    assert row.from_row is not None
    source_row = ctx.plan.row(row.from_row)
    source_config = row_config(ctx.plan, source_row, ctx.data_root, ctx.overrides)
    return ctx.row_paths(source_row.name).best_checkpoint(source_config)


def _check_source(paths: RowPaths, source: Path, started_fresh: bool) -> str:
    """Record (or compare) the sha256 of the checkpoint a transfer row started from."""
    digest = sha256_file(source)
    record = read_json(paths.source_record)
    if record is None or started_fresh:
        write_json_atomic(paths.source_record, {"checkpoint": str(source), "sha256": digest})
        return digest
    if record.get("sha256") != digest:
        raise CheckpointError(
            f"row {paths.name}: it was started from an earlier version of {source} "
            f"(sha256 {str(record.get('sha256'))[:12]}..., now {digest[:12]}...), because that "
            f"row was trained further. Delete {paths.root} to transfer again from the new one"
        )
    return digest


def _train_row(
    ctx: RunContext, row: PlanRow, config: ExperimentConfig, paths: RowPaths
) -> tuple[list[ExperimentConfig], str | None]:
    """Train all stages of a row; returns the stage configs and the source's sha256."""
    stages = paths.stage_dirs(config)
    source_sha: str | None = None
    first = config
    if row.kind == "transfer":
        source = _source_checkpoint(ctx, row)
        if not source.is_file():
            raise CheckpointError(
                f"row {row.name}: needs {source} (the best checkpoint of row {row.from_row}), "
                "which does not exist; run that row first"
            )
        fresh = not (stages[0] / "last.pt").is_file()
        source_sha = _check_source(paths, source, fresh)
        first = _transfer_config(config, source)
    elif len(stages) > 1:
        raise ConfigError(
            f"row {row.name}: its config has transfer.second_stage (a double transfer); "
            "make it a transfer row with from: <the row it starts from>"
        )
    configs = [first]
    train_stage(first, stages[0], progress=ctx.progress, log=ctx.log, label="train")
    if len(stages) > 1:
        leg1_best = stages[0] / "best.pt"
        if not leg1_best.is_file():
            raise CheckpointError(f"{stages[0]}: no best.pt (no epoch was validated)")
        second = second_leg_config(first, leg1_best)
        configs.append(second)
        train_stage(second, stages[1], progress=ctx.progress, log=ctx.log, label="leg 2")
    return configs, source_sha


def export_row_bundle(
    checkpoint: Path, bundle: Path, record: Path, data: Path | None, log: Log
) -> tuple[str, str]:
    """Export ``checkpoint`` to ``bundle`` unless the recorded export is of the same weights.

    Returns (checkpoint sha256, bundle sha256). This is the one place the runner exports.
    """
    from twinvae.export.bundle import ExportOptions, export_bundle

    checkpoint_sha = sha256_file(checkpoint)
    previous = read_json(record)
    if bundle.exists():
        if previous is None:
            raise ConfigError(
                f"{bundle}: exists but the runner has no record of exporting it ({record}); "
                "delete or move it"
            )
        if previous.get("checkpoint_sha256") == checkpoint_sha and previous.get(
            "bundle_sha256"
        ) == sha256_file(bundle):
            log(f"  export: {bundle} is up to date")
            return checkpoint_sha, str(previous["bundle_sha256"])
        log(f"  export: {checkpoint} changed since the last export; exporting again")
    else:
        log(f"  export: {checkpoint} -> {bundle}")
    result = export_bundle(checkpoint, bundle, ExportOptions(data=data, overwrite=bundle.exists()))
    write_json_atomic(
        record,
        {
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": checkpoint_sha,
            "bundle": str(bundle),
            "bundle_sha256": result.sha256,
            "seconds": result.seconds,
        },
    )
    return checkpoint_sha, result.sha256


def _evaluation_entry(
    set_name: str, model: str, tta: bool, report: dict[str, Any], command: str, json_path: Path
) -> dict[str, Any]:
    overall = report["overall"]
    return {
        "set": set_name,
        "model": model,
        "tta": tta,
        "n": int(overall["n"]),
        "mae": overall["mae"],
        "mre": overall["mre"],
        "accuracy": overall["accuracy"],
        "overall": overall,
        "metrics_format": report.get("metrics_format"),
        "growth": (report.get("growth") or {}).get("summary"),
        "per_count": report["per_count"],
        "command": command,
        "json": str(json_path),
    }


def _evaluate_model_row(
    ctx: RunContext, row: PlanRow, sets: list[str], bundle: Path, checkpoint: Path, paths: RowPaths
) -> list[dict[str, Any]]:
    from twinvae.evaluation.evaluate import evaluate

    entries = []
    for set_name in sets:
        image_set = ctx.image_set(set_name)
        json_path = paths.eval_dir / f"{set_name}.json"
        ctx.log(f"  evaluate: bundle on {set_name} ({len(image_set.labelled_only())} images)")
        report = evaluate(bundle, image_set)
        write_json_atomic(json_path, report)
        command = evaluate_command(bundle, set_name, ctx.data_root, json_path)
        entries.append(_evaluation_entry(set_name, "bundle", False, report, command, json_path))
        if row.tta and parse_set_name(set_name).domain == "natural":
            json_path = paths.eval_dir / f"{set_name}.tta.json"
            ctx.log(f"  evaluate: checkpoint with 8-fold TTA on {set_name}")
            report = evaluate(checkpoint, image_set, tta=True)
            write_json_atomic(json_path, report)
            command = evaluate_command(checkpoint, set_name, ctx.data_root, json_path, tta=True)
            entries.append(
                _evaluation_entry(set_name, "checkpoint", True, report, command, json_path)
            )
    return entries


def chamber_overlap(data_root: str, modality: Modality) -> dict[str, int] | None:
    """How many test chambers (experiment + position) also appear in the training split."""
    from twinvae.data.readers import modality_folder
    from twinvae.data.splits import parse_chamber
    from twinvae.errors import DataError

    chambers: dict[str, set[str]] = {}
    try:
        for split in ("train", "test"):
            folder = modality_folder(Path(data_root), modality, split)
            lines = (folder / f"{split}.csv").read_text(encoding="utf-8").splitlines()
            names = [line.split(",")[0].strip() for line in lines if line.strip()]
            chambers[split] = {parse_chamber(Path(n).name) for n in names if n}
    except (DataError, OSError):
        return None
    shared = chambers["train"] & chambers["test"]
    return {
        "train_chambers": len(chambers["train"]),
        "test_chambers": len(chambers["test"]),
        "test_chambers_also_in_train": len(shared),
    }


def _row_fingerprint(ctx: RunContext, row: PlanRow, extra: dict[str, Any]) -> str:
    return _fingerprint(
        {
            "row": row.model_dump(mode="json", by_alias=True),
            "plan_overrides": ctx.plan.overrides,
            "overrides": ctx.overrides,
            "data_root": str(Path(ctx.data_root).resolve()),
            **extra,
        }
    )


def _reproduce_row_command(ctx: RunContext, row: PlanRow) -> str:
    parts: list[str | Path] = ["twinvae", "experiment", ctx.plan_argument, "--only", row.name]
    parts += ["--out", ctx.out, "--data-root", ctx.data_root]
    for item in ctx.overrides:
        parts += ["--set", item]
    return _command(*parts)


def _training_summary(ctx: RunContext, row: PlanRow, stage_dirs: list[Path]) -> dict[str, Any]:
    stages: list[dict[str, Any]] = []
    for run_dir in stage_dirs:
        seconds, epochs = metrics_seconds(run_dir / "metrics.csv")
        stages.append({"run": str(run_dir), "seconds": seconds, "epochs": epochs})
    own = float(sum(s["seconds"] for s in stages))
    with_sources = own
    source = row.from_row
    while source is not None:
        source_row = ctx.plan.row(source)
        source_config = row_config(ctx.plan, source_row, ctx.data_root, ctx.overrides)
        for run_dir in ctx.row_paths(source).stage_dirs(source_config):
            with_sources += metrics_seconds(run_dir / "metrics.csv")[0]
        source = source_row.from_row
    return {
        "seconds": own,
        "seconds_with_sources": with_sources,
        "epochs": sum(s["epochs"] for s in stages),
        "stages": stages,
        "from": row.from_row,
    }


def _base_results(
    ctx: RunContext, row: PlanRow, modality: Modality, fingerprint: str
) -> dict[str, Any]:
    return {
        "format": RESULT_FORMAT,
        "protocol": "paper-split",
        "name": row.name,
        "kind": row.kind,
        "modality": modality,
        "paper": row.paper,
        "description": row.description,
        "from": row.from_row,
        "row": row.model_dump(mode="json", by_alias=True),
        "plan": {"name": ctx.plan.name, "file": ctx.plan.source or ctx.plan_argument},
        "fingerprint": fingerprint,
        "data_root": ctx.data_root,
        "data_root_resolved": str(Path(ctx.data_root).resolve()),
        "data_split": chamber_overlap(ctx.data_root, modality),
        "hardware": hardware_info(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "cwd": str(Path.cwd()),
    }


def _is_fresh(results: dict[str, Any] | None, fingerprint: str, files: dict[str, Path]) -> bool:
    if results is None or results.get("format") != RESULT_FORMAT:
        return False
    if results.get("fingerprint") != fingerprint:
        return False
    recorded = results.get("sha256") or {}
    for key, path in files.items():
        if not path.is_file() or recorded.get(key) != sha256_file(path):
            return False
    return True


def run_model_row(ctx: RunContext, row: PlanRow, dry_run: bool = False) -> RowOutcome:
    """Train/transfer, export and evaluate one row (or describe what would happen)."""
    config = row_config(ctx.plan, row, ctx.data_root, ctx.overrides)
    modality = final_modality(config)
    sets = row.test_sets or default_test_sets(modality)
    paths = ctx.row_paths(row.name)
    stage_dirs = paths.stage_dirs(config)
    best = stage_dirs[-1] / "best.pt"
    fingerprint = _row_fingerprint(ctx, row, {"config": _normalised(config), "sets": sets})
    results = read_json(paths.results)
    inputs = {"checkpoint": best, "bundle": paths.bundle}
    if row.kind == "transfer":
        inputs["source"] = _source_checkpoint(ctx, row)
    if _is_fresh(results, fingerprint, inputs):
        ctx.log(f"  up to date: {paths.results}")
        return RowOutcome(row.name, ["up to date"], paths.results)
    if dry_run:
        wanted: ExperimentConfig | None = config
        if row.kind == "transfer":
            source = _source_checkpoint(ctx, row)
            wanted = _transfer_config(config, source) if source.is_file() else None
        actions = [
            f"{stage_dirs[0].relative_to(paths.root)}: {stage_status(stage_dirs[0], wanted)}"
        ]
        actions += [f"{d.relative_to(paths.root)}: {stage_status(d)}" for d in stage_dirs[1:]]
        if row.kind == "transfer":
            actions.insert(0, f"transfer from {_source_checkpoint(ctx, row)}")
        actions += [f"export {paths.bundle}", f"evaluate on {', '.join(sets)}"]
        for action in actions:
            ctx.log(f"  would {action}" if not action.startswith("run") else f"  {action}")
        return RowOutcome(row.name, actions)
    started = time.perf_counter()
    configs, source_sha = _train_row(ctx, row, config, paths)
    if not best.is_file():
        raise CheckpointError(f"{stage_dirs[-1]}: training ended without best.pt")
    data_folder = Path(ctx.data_root) / modality
    checkpoint_sha, bundle_sha = export_row_bundle(
        best,
        paths.bundle,
        paths.export_record,
        data_folder if data_folder.is_dir() else None,
        ctx.log,
    )
    evaluations = _evaluate_model_row(ctx, row, sets, paths.bundle, best, paths)
    from twinvae.training.checkpoint import load_checkpoint

    best_checkpoint = load_checkpoint(best)
    final = configs[-1]
    payload = _base_results(ctx, row, modality, fingerprint)
    payload.update(
        {
            "config": final.model_dump(mode="json"),
            "natural_only": final.data.natural_only,
            "decoder_off": final.loss.decoder_off,
            "files": {
                "checkpoint": str(best.relative_to(paths.root)),
                "bundle": paths.bundle.name,
                "metrics": [str((d / "metrics.csv").relative_to(paths.root)) for d in stage_dirs],
            },
            "checkpoint": str(best),
            "bundle": str(paths.bundle),
            "sha256": {"checkpoint": checkpoint_sha, "bundle": bundle_sha, "source": source_sha},
            "best_epoch": best_checkpoint.epoch + 1,
            "best_val_mae": best_checkpoint.trainer_state.get("best_mae"),
            "training": _training_summary(ctx, row, stage_dirs),
            "evaluations": evaluations,
            "commands": _model_commands(ctx, row, stage_dirs, best, paths, data_folder),
            "runner_seconds": time.perf_counter() - started,
        }
    )
    write_json_atomic(paths.results, payload)
    ctx.log(f"  wrote {paths.results}")
    return RowOutcome(row.name, ["trained", "exported", "evaluated"], paths.results)


def _model_commands(
    ctx: RunContext,
    row: PlanRow,
    stage_dirs: list[Path],
    best: Path,
    paths: RowPaths,
    data_folder: Path,
) -> dict[str, str]:
    first_config = stage_dirs[0] / "config.yaml"
    rerun = Path("runs") / f"rerun-{row.name}"
    if row.kind == "transfer":
        source = _source_checkpoint(ctx, row)
        train = _command(
            "twinvae", "transfer", "--from", source, "--config", first_config, "--out", rerun
        )
    else:
        train = _command("twinvae", "train", "--config", first_config, "--out", rerun)
    return {
        "row": _reproduce_row_command(ctx, row),
        "train": train,
        "export": _command(
            "twinvae", "export", best, "--out", paths.bundle, "--data", data_folder, "--overwrite"
        ),
    }


def run_watershed_row(ctx: RunContext, row: PlanRow, dry_run: bool = False) -> RowOutcome:
    """Tune the watershed counter on the validation split and evaluate it on the test sets."""
    from twinvae.experiments import baselines

    assert row.modality is not None
    modality = row.modality
    sets = row.test_sets or default_test_sets(modality)
    grid = row.grid or baselines.default_grid(modality)
    baselines.expand_grid(grid)  # validate before any work
    paths = ctx.row_paths(row.name)
    fingerprint = _row_fingerprint(ctx, row, {"grid": grid, "sets": sets})
    results = read_json(paths.results)
    if _is_fresh(results, fingerprint, {"params": paths.watershed_params}):
        ctx.log(f"  up to date: {paths.results}")
        return RowOutcome(row.name, ["up to date"], paths.results)
    if dry_run:
        combos = len(baselines.expand_grid(grid))
        actions = [
            f"tune the watershed counter ({combos} parameter sets)",
            f"evaluate on {', '.join(sets)}",
        ]
        for action in actions:
            ctx.log(f"  would {action}")
        return RowOutcome(row.name, actions)
    started = time.perf_counter()
    paths.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths.watershed_grid, grid)
    validation = baselines.validation_set(ctx.data_root, modality)
    ctx.log(
        f"  tune: {len(baselines.expand_grid(grid))} parameter sets on {len(validation)} "
        "labelled validation images"
    )
    tuned = baselines.tune_watershed(
        validation.images, validation.counts, baselines.expand_grid(grid)
    )
    baselines.save_params(
        paths.watershed_params,
        tuned,
        modality=modality,
        grid=grid,
        tuned_on=_tuned_on(validation, ctx.data_root),
        overwrite=True,
    )
    evaluations = []
    for set_name in sets:
        json_path = paths.eval_dir / f"{set_name}.json"
        ctx.log(f"  evaluate: watershed on {set_name}")
        report = baselines.watershed_report(paths.watershed_params, ctx.image_set(set_name))
        write_json_atomic(json_path, report)
        parts: list[str | Path] = [
            "twinvae",
            "watershed",
            "evaluate",
            paths.watershed_params,
            "--data",
            set_name,
        ]
        if parse_set_name(set_name).domain == "natural":
            parts += ["--data-root", ctx.data_root]
        command = _command(*parts, "--json", json_path, "--overwrite")
        evaluations.append(
            _evaluation_entry(set_name, "watershed", False, report, command, json_path)
        )
    payload = _base_results(ctx, row, modality, fingerprint)
    payload.update(
        {
            "files": {"params": paths.watershed_params.name, "grid": paths.watershed_grid.name},
            "params": tuned.params.model_dump(),
            "validation": {"mae": tuned.mae, "accuracy": tuned.accuracy, "images": tuned.images},
            "sha256": {"params": sha256_file(paths.watershed_params)},
            "training": {
                "seconds": tuned.seconds,
                "seconds_with_sources": tuned.seconds,
                "epochs": 0,
                "stages": [],
                "from": None,
                "what": "parameter grid search",
            },
            "evaluations": evaluations,
            "commands": {
                "row": _reproduce_row_command(ctx, row),
                "train": _command(
                    "twinvae",
                    "watershed",
                    "tune",
                    "--data-root",
                    ctx.data_root,
                    "--modality",
                    modality,
                    "--grid",
                    paths.watershed_grid,
                    "--out",
                    paths.watershed_params,
                    "--overwrite",
                ),
            },
            "runner_seconds": time.perf_counter() - started,
        }
    )
    write_json_atomic(paths.results, payload)
    ctx.log(f"  wrote {paths.results}")
    return RowOutcome(row.name, ["tuned", "evaluated"], paths.results)


def _tuned_on(validation: ImageSet, data_root: str) -> dict[str, Any]:
    return {
        "data": validation.source,
        "data_root": data_root,
        "split": "chamber-based validation split of train (val_fraction 0.2, split_seed 0)",
        "images": len(validation),
    }


def run_plan(
    plan: Plan,
    out: Path,
    *,
    only: list[str] | None = None,
    dry_run: bool = False,
    data_root: str | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    log: Log = _quiet,
    plan_argument: str | None = None,
    keep_going: bool = False,
) -> list[RowOutcome]:
    """Run the rows of a plan (``only``: those rows and what they depend on) into ``out``.

    A row that fails with a user-facing error stops the run, or with ``keep_going`` is recorded
    as failed (``RowOutcome.failed``) while the rows that do not depend on it go on.
    """
    rows = execution_order(plan, only)
    ctx = RunContext(
        plan=plan,
        out=Path(out),
        data_root=plan_data_root(plan, data_root),
        overrides=list(overrides or []),
        progress=progress,
        log=log,
        plan_argument=plan_argument or plan.source or plan.name,
    )
    for row in rows:  # resolve every config first: a broken row fails before hours of training
        if row.kind != "watershed":
            row_config(plan, row, ctx.data_root, ctx.overrides)
    outcomes = []
    failed: set[str] = set()
    for index, row in enumerate(rows, start=1):
        log(f"[{index}/{len(rows)}] {row.name} ({row.kind})")
        if row.from_row in failed:
            log(f"  skipped: it starts from row {row.from_row}, which failed")
            failed.add(row.name)
            outcomes.append(RowOutcome(row.name, [f"skipped ({row.from_row} failed)"], failed=True))
            continue
        try:
            if row.kind == "watershed":
                outcomes.append(run_watershed_row(ctx, row, dry_run))
            else:
                outcomes.append(run_model_row(ctx, row, dry_run))
        except TwinVAEError as error:
            if not keep_going:
                raise
            log(f"  FAILED: {error}")
            failed.add(row.name)
            outcomes.append(RowOutcome(row.name, [f"FAILED: {error}"], failed=True))
    return outcomes
