"""Run one method under one evaluation protocol and write one result JSON per (protocol,
method, modality, fold).

Protocols (`PROTOCOLS`):

- ``paper-split``: train on train.csv, test on the labelled frames of test.csv (the authors'
  split; their chambers also appear in training, so this measures interpolation in time);
- ``chamber-cv``: k-fold cross-validation by chamber over the pooled frames of train.csv and
  test.csv (`twinvae.protocols.folds`); training, validation (cut by chamber from the training
  chambers), checkpoint choice and tuning never see a frame of the held-out chambers;
- ``anchored``: the authors' split, where methods may also use the labelled training frames of
  the chamber being counted at prediction time.

Methods: the image-free rules of `twinvae.protocols.rules` (``predict-training-mean``,
``nearest-label``, ``interpolate-label``), ``watershed`` (tuned on the chamber validation split
of the training data), any single-stage training config (e.g. ``cnn-baseline-pc``), which is
trained, exported as a bundle, and evaluated through the bundle, and ``bundle:PATH``, a finished
bundle (e.g. a model of the zoo) evaluated as it is (paper-split and anchored only: it was
trained on chambers a chamber-cv fold would hold out).

Layout: ``OUT/<protocol>/<modality>/<method>/<fold-K | split>/`` holds ``result.json``,
``eval.json`` (the `twinvae evaluate` report), and for models ``run/``, ``model.zip`` and
``export.json``; a chamber-cv fold also holds ``data/train.csv`` and ``data/heldout.csv`` (the
fold's frames as rows "absolute path,count"). Every step is idempotent: a finished unit is
skipped, an interrupted training resumes from ``last.pt``.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from twinvae.config import CONFIG_DIR, ExperimentConfig, apply_overrides, config_from_dict
from twinvae.data.imageset import ImageSet, Modality
from twinvae.data.readers import list_count_csv, modality_folder
from twinvae.data.splits import GroupBy, split_by_chamber, time_point
from twinvae.errors import CheckpointError, ConfigError
from twinvae.evaluation.metrics import METRICS_FORMAT
from twinvae.experiments.runner import (
    export_row_bundle,
    hardware_info,
    metrics_seconds,
    stage_status,
    train_stage,
)
from twinvae.fileio import atomic_writer, sha256_file
from twinvae.protocols import rules
from twinvae.protocols.folds import FoldFile, Frame, check_frames, list_frames, split_fold

Protocol = Literal["paper-split", "chamber-cv", "anchored"]
PROTOCOLS: dict[str, str] = {
    "paper-split": "the authors' train/test split: test frames of chambers that also appear in "
    "training (interpolation in time); the only protocol comparable with Table 2 of the paper",
    "chamber-cv": "k-fold cross-validation by chamber over the pooled frames of train.csv and "
    "test.csv: no frame of a held-out chamber is used for training, validation or tuning",
    "anchored": "the authors' train/test split; the labelled training frames of the chamber "
    "being counted may be used at prediction time",
}
RULES: dict[str, Callable[..., np.ndarray]] = {
    "predict-training-mean": rules.training_mean,
    "nearest-label": rules.nearest_label,
    "interpolate-label": rules.interpolate_label,
}
ANCHOR_RULES = ("nearest-label", "interpolate-label")
WATERSHED = "watershed"
BUNDLE_PREFIX = "bundle:"
RESULT_FORMAT = "twinvae-protocol-result/1"
RESULT_FILE = "result.json"
MethodKind = Literal["rule", "watershed", "model", "bundle"]
Log = Callable[[str], None]


def _quiet(_message: str) -> None:
    """The default log: say nothing."""


def _command(*parts: str | Path) -> str:
    return shlex.join(str(p) for p in parts)


def _evaluate_command(unit: Unit, *evaluator: str | Path) -> str:
    """The `twinvae <evaluator...>` command that writes the unit's evaluation report."""
    return _command(
        "twinvae", *evaluator, "--data", unit.test_csv, "--json", unit.eval_json, "--overwrite"
    )


def write_json(path: Path, payload: Any) -> None:
    """JSON (indent 2) through a temporary file: a kill never leaves half a file."""
    import json

    with atomic_writer(path) as stream:
        stream.write(json.dumps(payload, indent=2))


def read_json(path: Path) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- methods ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """What is evaluated: a rule, the watershed counter, a training config or a bundle."""

    name: str
    kind: MethodKind
    modality: Modality
    config: Path | None = None
    bundle: Path | None = None

    def check_protocol(self, protocol: str) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if self.name in ANCHOR_RULES and protocol != "anchored":
            raise ConfigError(
                f"method {self.name} predicts from labelled frames of the chamber being counted, "
                "so it applies to the anchored protocol only"
            )
        if self.kind == "bundle" and protocol == "chamber-cv":
            raise ConfigError(
                f"method {BUNDLE_PREFIX}{self.bundle}: a finished model was trained on chambers "
                "that the chamber-cv folds hold out; chamber-cv retrains a training config per "
                "fold (e.g. --method cnn-baseline-pc), so evaluate bundles with paper-split or "
                "anchored"
            )


def _config_file(source: str) -> Path | None:
    path = Path(source)
    if path.is_file():
        return path
    builtin = CONFIG_DIR / f"{source}.yaml"
    return builtin if builtin.is_file() else None


def _raw_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not a readable YAML config ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, ...)")
    return data


def bundle_modality(bundle: Path) -> Modality | None:
    """``data.modality`` of the config.yaml a twinvae bundle carries (None without one)."""
    from twinvae.runtime.twinvae_bundle import BundleError, open_bundle

    try:
        with open_bundle(bundle) as files:
            text = files.read("config.yaml") if "config.yaml" in files.names else None
    except (BundleError, OSError) as error:
        raise ConfigError(f"{bundle}: not a readable bioimage.io bundle ({error})") from None
    try:
        config = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        config = None
    data = config.get("data") if isinstance(config, dict) else None
    declared = data.get("modality") if isinstance(data, dict) else None
    return declared if declared in ("bf", "pc") else None


def _bundle_method(source: str, modality: str | None) -> Method:
    path = Path(source[len(BUNDLE_PREFIX) :])
    if not path.is_file():
        raise ConfigError(
            f"method {source}: {path} is not a file; give a bundle zip, e.g. one built with "
            "`twinvae zoo build NAME --out DIR` (then --method bundle:DIR/NAME.zip)"
        )
    own = bundle_modality(path)
    if own is None and modality is None:
        raise ConfigError(
            f"method {source}: the bundle names no modality (no data.modality in its "
            "config.yaml); pass --modality bf or pc"
        )
    if own is not None and modality is not None and own != modality:
        raise ConfigError(
            f"method {source}: the bundle counts {own} images (its config.yaml), not {modality}; "
            "leave out the modality"
        )
    return Method(path.stem, "bundle", own or modality, bundle=path)  # type: ignore[arg-type]


def resolve_method(method: str, modality: str | None) -> Method:
    """A rule or watershed (needs ``modality``), a training config or a bundle (their own
    modality)."""
    if modality is not None and modality not in ("bf", "pc"):
        raise ConfigError(f"modality {modality!r}: expected bf or pc")
    if method.startswith(BUNDLE_PREFIX):
        return _bundle_method(method, modality)
    if method in RULES or method == WATERSHED:
        if modality is None:
            raise ConfigError(f"method {method} needs a modality (bf or pc)")
        kind: MethodKind = "rule" if method in RULES else "watershed"
        return Method(method, kind, modality)  # type: ignore[arg-type]
    path = _config_file(method)
    if path is None:
        raise ConfigError(
            f"method {method!r} is neither {', '.join([*RULES, WATERSHED])} nor a config file or "
            f"builtin config (e.g. cnn-baseline-pc) nor {BUNDLE_PREFIX}PATH (a bundle zip)"
        )
    raw = _raw_config(path)
    if raw.get("transfer") is not None:
        raise ConfigError(
            f"method {method}: {path} is a transfer config; protocols train single-stage "
            "configs (e.g. cnn-baseline-pc, paper-pc)"
        )
    own = (raw.get("data") or {}).get("modality", "pc")
    if modality is not None and modality != own:
        raise ConfigError(
            f"method {method} trains on {own} (data.modality of {path}), not {modality}; leave "
            "out the modality or pick a config of that modality"
        )
    return Method(path.stem, "model", own, path)


# --- units: one result folder ----------------------------------------------------------------


@dataclass
class Unit:
    """One (protocol, method, modality, fold) and the files it reads and writes."""

    protocol: Protocol
    method: Method
    fold: int | None
    root: Path
    train_csv: Path
    test_csv: Path
    train_frames: list[Frame]
    test_frames: list[Frame]
    fold_file: Path | None = None
    folds: int | None = None

    @property
    def label(self) -> str:
        fold = f" fold {self.fold}" if self.fold is not None else ""
        return f"{self.protocol} {self.method.modality} {self.method.name}{fold}"

    @property
    def result(self) -> Path:
        return self.root / RESULT_FILE

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def bundle(self) -> Path:
        return self.root / "model.zip"

    @property
    def export_record(self) -> Path:
        return self.root / "export.json"

    @property
    def watershed_params(self) -> Path:
        return self.root / "watershed.json"


def unit_folder(out: Path, protocol: str, modality: str, method: str, fold: int | None) -> Path:
    return out / protocol / modality / method / (f"fold-{fold}" if fold is not None else "split")


def fold_csv_text(frames: list[Frame]) -> str:
    """CSV rows "absolute path,count" (the CHO-K1 layout) for these frames."""
    return "".join(f"{f.path.resolve().as_posix()},{f.count}\n" for f in frames)


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    with atomic_writer(path) as stream:
        stream.write(text)


@dataclass
class ProtocolRun:
    """Options shared by the units of one protocol command."""

    out: Path
    data_root: str
    overrides: list[str] = field(default_factory=list)
    progress: bool = False
    log: Log = _quiet
    fold_file: FoldFile | None = None
    fold_file_path: Path | None = None


def plan_units(
    protocol: Protocol, method: Method, run: ProtocolRun, folds: list[int] | None = None
) -> list[Unit]:
    """The units a command runs: one for the authors' split, one per chamber-cv fold."""
    method.check_protocol(protocol)
    modality = method.modality
    if protocol != "chamber-cv":
        if folds:
            raise ConfigError(f"--fold applies to chamber-cv only, not {protocol}")
        frames = list_frames(run.data_root, modality)
        train_csv = modality_folder(Path(run.data_root), modality, "train") / "train.csv"
        test_csv = modality_folder(Path(run.data_root), modality, "test") / "test.csv"
        root = unit_folder(run.out, protocol, modality, method.name, None)
        return [
            Unit(
                protocol,
                method,
                None,
                root,
                train_csv,
                test_csv,
                [f for f in frames if f.split == "train"],
                [f for f in frames if f.split == "test"],
            )
        ]
    if run.fold_file is None or run.fold_file_path is None:
        raise ConfigError("chamber-cv needs a fold file")
    if run.fold_file.modality != modality:
        raise ConfigError(
            f"{run.fold_file_path}: folds of {run.fold_file.modality}, but method "
            f"{method.name} is {modality}"
        )
    frames = list_frames(run.data_root, modality)
    check_frames(run.fold_file, frames, str(Path(run.data_root) / modality))
    chosen = folds if folds else list(range(len(run.fold_file.folds)))
    units = []
    for fold in chosen:
        train, test = split_fold(run.fold_file, frames, fold)
        root = unit_folder(run.out, protocol, modality, method.name, fold)
        units.append(
            Unit(
                protocol,
                method,
                fold,
                root,
                root / "data" / "train.csv",
                root / "data" / "heldout.csv",
                train,
                test,
                run.fold_file_path,
                len(run.fold_file.folds),
            )
        )
    return units


def _prepare_data(unit: Unit) -> None:
    """Write a chamber-cv fold's train.csv and heldout.csv (unchanged files are not touched)."""
    if unit.protocol != "chamber-cv":
        return
    for path, frames in ((unit.train_csv, unit.train_frames), (unit.test_csv, unit.test_frames)):
        _write_if_changed(path, fold_csv_text(frames))


# --- evaluating without images -----------------------------------------------------------------


def _listed_set(csv_path: Path, *, labelled: bool) -> ImageSet:
    """Names and counts of a CSV as an ImageSet whose images are 1x1 placeholders (rules never
    look at images; the evaluation report needs only names and counts)."""
    rows = [r for r in list_count_csv(csv_path) if r[1] > 0 or not labelled]
    return ImageSet(
        images=np.zeros((len(rows), 1, 1), dtype=np.uint8),
        counts=np.array([count for _, count in rows], dtype=np.int16),
        names=[name for name, _ in rows],
        source=str(csv_path),
    )


def _anchors(csv_path: Path) -> list[rules.Anchor]:
    anchors = []
    for name, count in list_count_csv(csv_path):
        point = time_point(name)
        if count > 0 and point is not None:
            anchors.append(rules.Anchor(point[0], point[1], count))
    return anchors


def _targets(image_set: ImageSet) -> list[tuple[str, int]]:
    points = [time_point(name) for name in image_set.names]
    return [p if p is not None else ("", -1) for p in points]


def _validation_chambers(
    unit: Unit, val_fraction: float, seed: int, group_by: GroupBy = "chamber"
) -> list[str]:
    """The chambers the trainer (and watershed tuning) cut from the training CSV as validation."""
    listed = _listed_set(unit.train_csv, labelled=False)
    _, val = split_by_chamber(listed, val_fraction=val_fraction, seed=seed, group_by=group_by)
    return sorted({p[0] for p in (time_point(n) for n in val.names) if p is not None})


# --- results ---------------------------------------------------------------------------------


def _chambers(frames: list[Frame]) -> list[str]:
    return sorted({f.chamber for f in frames})


def protocol_command(unit: Unit, run: ProtocolRun) -> str:
    """The `twinvae protocol` command line that makes this unit's result."""
    method = unit.method
    parts: list[str | Path] = ["twinvae", "protocol", unit.protocol, "--method"]
    builtin = method.config is not None and method.config.resolve().parent == CONFIG_DIR.resolve()
    if method.kind == "bundle":
        parts.append(f"{BUNDLE_PREFIX}{method.bundle}")
    else:
        parts.append(method.name if method.config is None or builtin else method.config)
    if method.kind != "model":  # a config names its modality; for a bundle it is checked
        parts += ["--modality", method.modality]
    if unit.fold is not None:
        parts += ["--fold", str(unit.fold)]
        if unit.fold_file is not None and unit.fold_file.resolve().parent != _default_fold_dir():
            parts += ["--folds-file", unit.fold_file]
    parts += ["--out", run.out, "--data-root", run.data_root]
    for item in run.overrides:
        parts += ["--set", item]
    return _command(*parts)


def _default_fold_dir() -> Path:
    from twinvae.protocols.folds import FOLD_DIR

    return FOLD_DIR.resolve()


def _fingerprint(unit: Unit, run: ProtocolRun, extra: dict[str, Any]) -> str:
    import hashlib
    import json

    payload = {
        "protocol": unit.protocol,
        "method": unit.method.name,
        "modality": unit.method.modality,
        "fold": unit.fold,
        "fold_file_sha256": sha256_file(unit.fold_file) if unit.fold_file else None,
        "train_csv_sha256": sha256_file(unit.train_csv),
        "test_csv_sha256": sha256_file(unit.test_csv),
        "overrides": run.overrides,
        **extra,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _base_result(unit: Unit, run: ProtocolRun, report: dict[str, Any]) -> dict[str, Any]:
    labelled_train = [f for f in unit.train_frames if f.labelled]
    labelled_test = [f for f in unit.test_frames if f.labelled]
    return {
        "format": RESULT_FORMAT,
        "protocol": unit.protocol,
        "protocol_description": PROTOCOLS[unit.protocol],
        "method": unit.method.name,
        "method_kind": unit.method.kind,
        "modality": unit.method.modality,
        "fold": unit.fold,
        "folds": unit.folds,
        "fold_file": str(unit.fold_file) if unit.fold_file else None,
        "fold_file_sha256": sha256_file(unit.fold_file) if unit.fold_file else None,
        "uses_anchors": unit.method.name in ANCHOR_RULES,
        "data_root": run.data_root,
        "data_root_resolved": str(Path(run.data_root).resolve()),
        "data": {
            "train_csv": str(unit.train_csv),
            "test_csv": str(unit.test_csv),
            "train_images": len(unit.train_frames),
            "train_labelled": len(labelled_train),
            "test_images": len(unit.test_frames),
            "test_labelled": len(labelled_test),
        },
        "chambers": {
            "train": _chambers(unit.train_frames),
            "test": _chambers(unit.test_frames),
            "test_also_in_train": sorted(
                set(_chambers(unit.train_frames)) & set(_chambers(unit.test_frames))
            ),
        },
        "metrics_format": report.get("metrics_format", METRICS_FORMAT),
        "definitions": report.get("definitions"),
        "overall": report["overall"],
        "per_count": report["per_count"],
        "growth": report.get("growth"),
        "eval_json": unit.eval_json.name,
        "hardware": hardware_info(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "cwd": str(Path.cwd()),
    }


def _finish(unit: Unit, payload: dict[str, Any], log: Log) -> Path:
    write_json(unit.result, payload)
    overall = payload["overall"]
    log(
        f"  {unit.label}: MAE {overall['mae']:.3f}, accuracy {100 * overall['accuracy']:.1f} % "
        f"on {overall['n']} images -> {unit.result}"
    )
    return unit.result


def _is_fresh(unit: Unit, fingerprint: str, files: dict[str, Path]) -> bool:
    result = read_json(unit.result)
    if result is None or result.get("format") != RESULT_FORMAT:
        return False
    if result.get("fingerprint") != fingerprint or not unit.eval_json.is_file():
        return False
    recorded = result.get("sha256") or {}
    return all(p.is_file() and recorded.get(k) == sha256_file(p) for k, p in files.items())


# --- the three kinds of method ---------------------------------------------------------------


def run_rule_unit(unit: Unit, run: ProtocolRun) -> Path:
    """Predict every labelled test frame with an image-free rule."""
    from twinvae.evaluation.evaluate import prediction_report

    _prepare_data(unit)
    test = _listed_set(unit.test_csv, labelled=True)
    predictions = RULES[unit.method.name](_anchors(unit.train_csv), _targets(test))
    report = prediction_report(predictions, test, model=unit.method.name)
    write_json(unit.eval_json, report)
    payload = _base_result(unit, run, report)
    payload.update(
        {
            "fingerprint": _fingerprint(unit, run, {}),
            "commands": {"result": protocol_command(unit, run)},
        }
    )
    return _finish(unit, payload, run.log)


def run_watershed_unit(unit: Unit, run: ProtocolRun, *, dry_run: bool = False) -> Path | None:
    """Tune the watershed counter on the chamber validation split of the training frames,
    then count the labelled test frames."""
    from twinvae.data.readers import read_count_csv
    from twinvae.experiments import baselines

    if not dry_run:
        _prepare_data(unit)
    grid = baselines.default_grid(unit.method.modality)
    if unit.train_csv.is_file() and unit.test_csv.is_file():
        fingerprint = _fingerprint(unit, run, {"grid": grid})
        if _is_fresh(unit, fingerprint, {"params": unit.watershed_params}):
            run.log(f"  {unit.label}: up to date ({unit.result})")
            return unit.result
    if dry_run:
        run.log(f"  {unit.label}: would tune the watershed counter and evaluate it")
        return None
    fingerprint = _fingerprint(unit, run, {"grid": grid})
    started = time.perf_counter()
    train = read_count_csv(unit.train_csv, modality=unit.method.modality)
    _, val = split_by_chamber(train, val_fraction=0.2, seed=0)
    validation = val.labelled_only()
    candidates = baselines.expand_grid(grid)
    run.log(
        f"  {unit.label}: tuning {len(candidates)} parameter sets on {len(validation)} labelled "
        "validation images"
    )
    tuned = baselines.tune_watershed(validation.images, validation.counts, candidates)
    baselines.save_params(
        unit.watershed_params,
        tuned,
        modality=unit.method.modality,
        grid=grid,
        tuned_on={
            "data": str(unit.train_csv),
            "split": "chamber-based validation split (val_fraction 0.2, split_seed 0)",
            "images": len(validation),
        },
        overwrite=True,
    )
    test = read_count_csv(unit.test_csv, modality=unit.method.modality)
    report = baselines.watershed_report(unit.watershed_params, test)
    write_json(unit.eval_json, report)
    payload = _base_result(unit, run, report)
    payload["chambers"]["validation"] = _validation_chambers(unit, 0.2, 0)
    payload.update(
        {
            "fingerprint": fingerprint,
            "params": tuned.params.model_dump(),
            "validation": {"mae": tuned.mae, "accuracy": tuned.accuracy, "images": tuned.images},
            "sha256": {"params": sha256_file(unit.watershed_params)},
            "training": {"seconds": tuned.seconds, "what": "parameter grid search"},
            "commands": {
                "result": protocol_command(unit, run),
                "evaluate": _evaluate_command(unit, "watershed", "evaluate", unit.watershed_params),
            },
            "runner_seconds": time.perf_counter() - started,
        }
    )
    return _finish(unit, payload, run.log)


def model_config(unit: Unit, run: ProtocolRun) -> ExperimentConfig:
    """The method's config trained on the unit's training frames (then the --set overrides)."""
    assert unit.method.config is not None
    raw = _raw_config(unit.method.config)
    fold = f"-fold{unit.fold}" if unit.fold is not None else ""
    raw["name"] = f"{unit.method.name}-{unit.protocol}{fold}"
    data = raw.setdefault("data", {})
    data["modality"] = unit.method.modality
    if unit.protocol == "chamber-cv":
        data["natural"] = str(unit.train_csv)
    else:
        data["natural"] = str(unit.train_csv.parent)
        data["natural_split"] = "train"
    apply_overrides(raw, run.overrides)
    config = config_from_dict(
        raw,
        origin=f"{unit.method.config} ({unit.label})",
        overrides=run.overrides,
        data_root=run.data_root,
    )
    if config.data.natural != data["natural"] or config.transfer is not None:
        raise ConfigError(
            f"{unit.label}: --set may not change data.natural or add transfer (the protocol "
            "decides what a model trains on)"
        )
    return config


def run_model_unit(unit: Unit, run: ProtocolRun, *, dry_run: bool = False) -> Path | None:
    """Train on the unit's training frames (validation cut by chamber from them), export the
    bundle, and evaluate the bundle on the labelled test frames."""
    if not dry_run:
        _prepare_data(unit)
    config = model_config(unit, run)
    best = unit.run / "best.pt"
    if unit.train_csv.is_file() and unit.test_csv.is_file():
        fingerprint = _fingerprint(unit, run, {"config": config.model_dump(mode="json")})
        if _is_fresh(unit, fingerprint, {"checkpoint": best, "bundle": unit.bundle}):
            run.log(f"  {unit.label}: up to date ({unit.result})")
            return unit.result
    if dry_run:
        run.log(
            f"  {unit.label}: {unit.run}: would {stage_status(unit.run, config)}; "
            f"export {unit.bundle}; evaluate the bundle on {unit.test_csv}"
        )
        return None
    fingerprint = _fingerprint(unit, run, {"config": config.model_dump(mode="json")})
    started = time.perf_counter()
    train_stage(config, unit.run, progress=run.progress, log=run.log, label=f"{unit.label} train")
    if not best.is_file():
        raise CheckpointError(f"{unit.run}: training ended without best.pt")
    export_data = unit.train_csv if unit.protocol == "chamber-cv" else unit.test_csv.parent
    checkpoint_sha, bundle_sha = export_row_bundle(
        best, unit.bundle, unit.export_record, export_data, run.log
    )
    from twinvae.data.readers import read_count_csv
    from twinvae.evaluation.evaluate import evaluate
    from twinvae.training.checkpoint import load_checkpoint

    test = read_count_csv(unit.test_csv, modality=unit.method.modality)
    if config.data.chamber_background != "off":  # the bundle counts normalised images
        from twinvae.training.data import chamber_normalised

        test = chamber_normalised(test, config.data.chamber_background)
    run.log(f"  {unit.label}: evaluating the bundle on {int(test.labelled.sum())} images")
    report = evaluate(unit.bundle, test)
    write_json(unit.eval_json, report)
    checkpoint = load_checkpoint(best)
    seconds, epochs = metrics_seconds(unit.run / "metrics.csv")
    payload = _base_result(unit, run, report)
    payload["chambers"]["validation"] = _validation_chambers(
        unit, config.data.val_fraction, config.data.split_seed, config.data.split_by
    )
    payload.update(
        {
            "fingerprint": fingerprint,
            "config": config.model_dump(mode="json"),
            "config_source": str(unit.method.config),
            "sha256": {"checkpoint": checkpoint_sha, "bundle": bundle_sha},
            "best_epoch": checkpoint.epoch + 1,
            "best_val_mae_unrounded": checkpoint.trainer_state.get("best_mae"),
            "training": {"seconds": seconds, "epochs": epochs, "run": str(unit.run)},
            "files": {
                "run": "run",
                "checkpoint": "run/best.pt",
                "bundle": unit.bundle.name,
                "metrics": "run/metrics.csv",
            },
            "commands": {
                "result": protocol_command(unit, run),
                "train": _command(
                    "twinvae",
                    "train",
                    "--config",
                    unit.run / "config.yaml",
                    "--out",
                    unit.root / "rerun",
                ),
                "resume": _command("twinvae", "train", "--resume", unit.run),
                "export": _command(
                    "twinvae",
                    "export",
                    best,
                    "--out",
                    unit.bundle,
                    "--data",
                    export_data,
                    "--overwrite",
                ),
                "evaluate": _evaluate_command(unit, "evaluate", unit.bundle),
            },
            "runner_seconds": time.perf_counter() - started,
        }
    )
    return _finish(unit, payload, run.log)


def zoo_entry_of(bundle: Path, bundle_sha256: str) -> dict[str, Any] | None:
    """The entry of the project's model zoo whose ONNX weights (what `evaluate` runs) are the
    bundle's; other members, e.g. rdf.yaml, change with the twinvae version that builds it."""
    import hashlib

    from twinvae.model_zoo.manifest import load_manifest
    from twinvae.model_zoo.zoo import default_zoo_dir
    from twinvae.runtime.twinvae_bundle import open_bundle, read_bundle_info

    try:
        manifest = load_manifest(default_zoo_dir())
    except ConfigError:  # no zoo beside this installation: nothing to name
        return None
    with open_bundle(bundle) as files:
        onnx_name = read_bundle_info(files).onnx_file
        onnx_sha = hashlib.sha256(files.read(onnx_name)).hexdigest()
    for entry in manifest.models:
        if entry.members.get(onnx_name) == onnx_sha:
            return {
                "name": entry.name,
                "recipe": entry.recipe,
                "weights_onnx_sha256": onnx_sha,
                "same_bundle_as_recorded": entry.bundle_sha256 == bundle_sha256,
            }
    return None


def run_bundle_unit(unit: Unit, run: ProtocolRun, *, dry_run: bool = False) -> Path | None:
    """Evaluate a finished bundle on the labelled test frames (nothing is trained)."""
    from twinvae.data.readers import read_count_csv
    from twinvae.evaluation.evaluate import evaluate

    bundle = unit.method.bundle
    assert bundle is not None
    bundle_sha = sha256_file(bundle)
    fingerprint = _fingerprint(unit, run, {"bundle_sha256": bundle_sha})
    if _is_fresh(unit, fingerprint, {"bundle": bundle}):
        run.log(f"  {unit.label}: up to date ({unit.result})")
        return unit.result
    if dry_run:
        run.log(f"  {unit.label}: would evaluate {bundle} on {unit.test_csv}")
        return None
    started = time.perf_counter()
    test = read_count_csv(unit.test_csv, modality=unit.method.modality)
    run.log(f"  {unit.label}: evaluating {bundle} on {int(test.labelled.sum())} images")
    report = evaluate(bundle, test)
    write_json(unit.eval_json, report)
    payload = _base_result(unit, run, report)
    commands = {
        "result": protocol_command(unit, run),
        "evaluate": _evaluate_command(unit, "evaluate", bundle),
    }
    zoo_entry = zoo_entry_of(bundle, bundle_sha)
    if zoo_entry is not None:  # how to make the same bundle again
        commands["bundle"] = _command(
            "twinvae", "zoo", "build", zoo_entry["name"], "--out", bundle.parent
        )
    payload.update(
        {
            "fingerprint": fingerprint,
            "bundle": str(bundle),
            "zoo_entry": zoo_entry,
            "sha256": {"bundle": bundle_sha},
            "commands": commands,
            "runner_seconds": time.perf_counter() - started,
        }
    )
    return _finish(unit, payload, run.log)


def run_anchored_model(unit: Unit, run: ProtocolRun, *, dry_run: bool = False) -> Path | None:
    """An image-only model counts without the anchors: its anchored result is its paper-split
    result (trained, or for a bundle evaluated, or reused under the paper-split folder),
    recorded under anchored."""
    source = Unit(
        "paper-split",
        unit.method,
        None,
        unit_folder(run.out, "paper-split", unit.method.modality, unit.method.name, None),
        unit.train_csv,
        unit.test_csv,
        unit.train_frames,
        unit.test_frames,
    )
    run_source = run_bundle_unit if unit.method.kind == "bundle" else run_model_unit
    result = run_source(source, run, dry_run=dry_run)
    if result is None:
        return None
    payload = read_json(result)
    assert payload is not None
    payload.update(
        {
            "protocol": "anchored",
            "protocol_description": PROTOCOLS["anchored"],
            "same_as": str(result),
            "eval_json": os.path.relpath(source.eval_json, unit.root),
        }
    )
    payload["commands"]["result"] = protocol_command(unit, run)
    write_json(unit.result, payload)
    run.log(f"  {unit.label}: image-only model, same numbers as {result}")
    return unit.result


@dataclass
class UnitOutcome:
    unit: Unit
    result: Path | None
    seconds: float


def run_protocol(
    protocol: Protocol,
    method: Method,
    run: ProtocolRun,
    *,
    folds: list[int] | None = None,
    dry_run: bool = False,
) -> list[UnitOutcome]:
    """Run (or with ``dry_run`` describe) every unit of a protocol for one method."""
    units = plan_units(protocol, method, run, folds)
    outcomes = []
    for index, unit in enumerate(units, start=1):
        run.log(f"[{index}/{len(units)}] {unit.label} -> {unit.root}")
        started = time.perf_counter()
        result: Path | None
        if method.kind == "rule":
            result = None if dry_run else run_rule_unit(unit, run)
            if dry_run:
                run.log(f"  {unit.label}: would predict {len(unit.test_frames)} frames")
        elif method.kind == "watershed":
            result = run_watershed_unit(unit, run, dry_run=dry_run)
        elif protocol == "anchored":
            result = run_anchored_model(unit, run, dry_run=dry_run)
        elif method.kind == "bundle":
            result = run_bundle_unit(unit, run, dry_run=dry_run)
        else:
            result = run_model_unit(unit, run, dry_run=dry_run)
        outcomes.append(UnitOutcome(unit, result, time.perf_counter() - started))
    return outcomes
