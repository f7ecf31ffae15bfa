"""Evaluation protocols: committed chamber folds, image-free rules, results and summaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from _experiment_data import write_fake_cho_k1
from twinvae.cli.main import app
from twinvae.data.readers import list_count_csv
from twinvae.data.splits import parse_chamber
from twinvae.errors import ConfigError
from twinvae.protocols import rules
from twinvae.protocols.folds import (
    FoldFile,
    check_frames,
    fold_file_path,
    fold_file_text,
    list_frames,
    load_folds,
    make_fold_file,
    split_fold,
)
from twinvae.protocols.runner import (
    ProtocolRun,
    fold_csv_text,
    plan_units,
    resolve_method,
    run_protocol,
)
from twinvae.protocols.summary import collect, summarize

runner = CliRunner()


# --- committed folds -------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["pc", "bf"])
def test_committed_folds_hold_every_chamber_once_and_span_low_and_high_counts(
    modality: str,
) -> None:
    folds = load_folds(modality)
    assert folds.modality == modality and len(folds.folds) == 4
    listed = [chamber for fold in folds.folds for chamber in fold]
    assert sorted(listed) == sorted(folds.chambers) and len(listed) == len(set(listed))
    means = {c: s.mean_count for c, s in folds.chambers.items()}
    median = float(np.median([m for m in means.values() if m is not None]))
    for fold in folds.folds:  # every fold holds a chamber below and one at or above the median
        assert min(means[c] or 0 for c in fold) < median <= max(means[c] or 0 for c in fold)


def test_fold_files_refuse_a_chamber_in_two_folds(tmp_path: Path) -> None:
    folds = load_folds("bf").model_dump(mode="json")
    folds["folds"][1].append(folds["folds"][0][0])
    broken = tmp_path / "folds.yaml"
    broken.write_text(json.dumps(folds), encoding="utf-8")
    with pytest.raises(ConfigError, match="is in fold 0 and 1"):
        load_folds(broken)


@pytest.mark.parametrize("modality", ["pc", "bf"])
def test_committed_folds_fit_the_real_data_and_are_reproducible(
    cho_k1_root: Path, modality: str, tmp_path: Path
) -> None:
    frames = list_frames(cho_k1_root, modality)  # type: ignore[arg-type]
    committed = load_folds(modality)
    check_frames(committed, frames, str(cho_k1_root))
    assert {f.chamber for f in frames} == set(committed.chambers)
    assert len(committed.chambers) == {"pc": 13, "bf": 8}[modality]
    assert make_fold_file(frames, modality, 4, committed.seed) == committed  # type: ignore[arg-type]
    assert fold_file_text(committed) == fold_file_path(modality).read_text(encoding="utf-8")  # type: ignore[arg-type]
    for fold in range(4):
        train, test = split_fold(committed, frames, fold)
        assert len(train) + len(test) == len(frames)
        assert not {f.chamber for f in train} & {f.chamber for f in test}
        assert {f.chamber for f in test} == set(committed.folds[fold])
    # the training CSV each fold trains on holds no frame of its held-out chambers
    run = ProtocolRun(tmp_path, str(cho_k1_root))
    run.fold_file, run.fold_file_path = committed, fold_file_path(modality)  # type: ignore[arg-type]
    method = resolve_method("predict-training-mean", modality)
    for unit in plan_units("chamber-cv", method, run):
        assert unit.fold is not None
        rows = fold_csv_text(unit.train_frames).splitlines()
        trained = {parse_chamber(row.rsplit(",", 1)[0]) for row in rows}
        assert not trained & set(committed.folds[unit.fold])
        assert len(rows) + len(unit.test_frames) == len(frames)


# --- rules -----------------------------------------------------------------------------------

ANCHORS = [rules.Anchor("a", 10, 4), rules.Anchor("a", 20, 8), rules.Anchor("b", 5, 2)]


def test_nearest_label_prefers_the_earlier_frame_on_ties() -> None:
    targets = [("a", 15), ("a", 16), ("a", 3), ("b", 50), ("c", 1)]
    predicted = rules.nearest_label(ANCHORS, targets)
    assert predicted.tolist() == [4, 8, 4, 2, pytest.approx(14 / 3)]  # c: the training mean


def test_interpolate_label_is_linear_in_time_and_flat_outside() -> None:
    targets = [("a", 15), ("a", 12), ("a", 30), ("b", 1), ("c", 1)]
    predicted = rules.interpolate_label(ANCHORS, targets)
    assert predicted.tolist() == pytest.approx([6.0, 4.8, 8.0, 2.0, 14 / 3])
    assert rules.training_mean(ANCHORS, targets).tolist() == pytest.approx([14 / 3] * 5)


# --- chamber and frame of generic folders ----------------------------------------------------


def test_a_generic_folder_may_give_chamber_and_frame_columns(tmp_path: Path) -> None:
    from PIL import Image

    from twinvae.data.readers import read_image_folder
    from twinvae.data.splits import image_time_points
    from twinvae.errors import DataError

    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((128, 128), np.uint8)).save(tmp_path / name)
    counts = tmp_path / "counts.csv"
    counts.write_text("filename,count,chamber,frame\na.png,2,left,4\nb.png,0,left,9\n")
    image_set = read_image_folder(tmp_path)
    assert image_time_points(image_set) == [("left", 4), ("left", 9), None]
    assert image_set.counts.tolist() == [2, 0, 0]
    assert image_time_points(image_set.labelled_only()) == [("left", 4)]
    counts.write_text("filename,count,chamber,frame\na.png,2,left,late\n")
    with pytest.raises(DataError, match="line 2: malformed row: frame 'late'"):
        read_image_folder(tmp_path)


# --- protocols on a small generated CHO-K1 tree ----------------------------------------------


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_cho_k1(
        tmp_path_factory.mktemp("cho-k1"), train_chambers=5, frames=8, test_frames=4
    )


@pytest.fixture(scope="module")
def fake_folds(fake_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("folds") / "folds.yaml"
    path.write_text(fold_file_text(make_fold_file(list_frames(fake_root, "pc"), "pc", 2, 0)))
    return path


def _run(root: Path, out: Path, protocol: str, method: str, folds: Path | None = None) -> Any:
    run = ProtocolRun(out, str(root))
    if folds is not None:
        run.fold_file, run.fold_file_path = load_folds(folds), folds
    return run_protocol(protocol, resolve_method(method, "pc"), run)  # type: ignore[arg-type]


def _result(path: Path | None) -> dict[str, Any]:
    assert path is not None
    return dict(json.loads(path.read_text(encoding="utf-8")))


def test_chamber_cv_holds_out_whole_chambers_and_names_protocol_and_fold(
    fake_root: Path, fake_folds: Path, tmp_path: Path
) -> None:
    folds: FoldFile = load_folds(fake_folds)
    outcomes = _run(fake_root, tmp_path, "chamber-cv", "predict-training-mean", fake_folds)
    assert [o.unit.fold for o in outcomes] == [0, 1]
    for outcome in outcomes:
        result = _result(outcome.result)
        assert (result["protocol"], result["method"], result["fold"]) == (
            "chamber-cv",
            "predict-training-mean",
            outcome.unit.fold,
        )
        held_out = set(folds.folds[outcome.unit.fold])
        train_rows = list_count_csv(outcome.unit.train_csv)
        test_rows = list_count_csv(outcome.unit.test_csv)
        assert not {parse_chamber(name) for name, _ in train_rows} & held_out
        assert {parse_chamber(name) for name, _ in test_rows} == held_out
        assert result["chambers"]["test_also_in_train"] == []
        # the rule predicts the mean labelled count of the training chambers' frames
        mean = np.mean([count for _, count in train_rows if count > 0])
        predictions = json.loads(outcome.unit.eval_json.read_text())["predictions"]
        assert [p["predicted"] for p in predictions] == pytest.approx([mean] * len(predictions))
        assert result["overall"]["n"] == sum(1 for _, count in test_rows if count > 0)


def test_anchored_rules_use_the_same_chambers_labelled_training_frames(
    fake_root: Path, tmp_path: Path
) -> None:
    result = _result(_run(fake_root, tmp_path, "anchored", "nearest-label")[0].result)
    assert result["protocol"] == "anchored" and result["uses_anchors"] is True
    assert result["chambers"]["test_also_in_train"] == result["chambers"]["test"]
    frames = list_frames(fake_root, "pc")
    anchors = [rules.Anchor(f.chamber, f.frame, f.count) for f in frames if f.split == "train"]
    expected = {
        (f.chamber, f.frame, f.count): rules.nearest_label(
            [a for a in anchors if a.count > 0], [(f.chamber, f.frame)]
        )[0]
        for f in frames
        if f.split == "test" and f.labelled
    }
    report = json.loads((tmp_path / "anchored/pc/nearest-label/split/eval.json").read_text())
    assert len(report["predictions"]) == len(expected) > 0
    assert all(
        p["predicted"] == expected[(p["chamber"], p["frame"], p["count"])]
        for p in report["predictions"]
    )


def test_anchor_rules_refuse_other_protocols() -> None:
    with pytest.raises(ConfigError, match="anchored protocol only"):
        resolve_method("nearest-label", "pc").check_protocol("chamber-cv")
    with pytest.raises(ConfigError, match="needs a modality"):
        resolve_method("watershed", None)
    with pytest.raises(ConfigError, match="trains on pc"):
        resolve_method("cnn-baseline-pc", "bf")


def test_summary_gives_mean_and_sample_sd_over_folds(
    fake_root: Path, fake_folds: Path, tmp_path: Path
) -> None:
    _run(fake_root, tmp_path, "chamber-cv", "predict-training-mean", fake_folds)
    _run(fake_root, tmp_path, "paper-split", "predict-training-mean")
    entries = summarize(collect(tmp_path))
    assert [e["protocol"] for e in entries] == ["paper-split", "chamber-cv"]
    cv = entries[1]
    maes = [fold["mae"] for fold in cv["per_fold"]]
    assert cv["complete"] and cv["folds_done"] == [0, 1]
    assert cv["mean"]["mae"] == pytest.approx(np.mean(maes))
    assert cv["std"]["mae"] == pytest.approx(np.std(maes, ddof=1))
    assert cv["pooled"]["overall"]["n"] == sum(fold["n"] for fold in cv["per_fold"])
    assert entries[0]["std"]["mae"] is None


def test_protocol_cli_runs_and_sums_up(fake_root: Path, fake_folds: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ["--method", "interpolate-label", "--modality", "pc", "--out", str(out)]
    done = runner.invoke(app, ["protocol", "anchored", *common, "--data-root", str(fake_root)])
    assert done.exit_code == 0, done.output
    folds = ["--data-root", str(fake_root), "--folds-file", str(fake_folds)]
    refused = runner.invoke(app, ["protocol", "chamber-cv", *common, *folds])
    assert refused.exit_code == 1 and "anchored protocol only" in str(refused.exception)
    summary = tmp_path / "summary.json"
    shown = runner.invoke(app, ["protocol", "summary", str(out), "--json", str(summary)])
    assert shown.exit_code == 0, shown.output
    assert "anchored, PC" in shown.output
    entry = json.loads(summary.read_text())["entries"][0]
    assert (entry["protocol"], entry["method"]) == ("anchored", "interpolate-label")


# --- the numbers on the real data ----------------------------------------------------


@pytest.mark.parametrize(
    ("modality", "images", "accuracy", "mae"),
    [("pc", 398, 0.513, 0.78), ("bf", 290, 0.672, 0.44)],
)
def test_nearest_label_reproduces_the_anchored_numbers(
    cho_k1_root: Path, tmp_path: Path, modality: str, images: int, accuracy: float, mae: float
) -> None:
    run = ProtocolRun(tmp_path, str(cho_k1_root))
    outcome = run_protocol("anchored", resolve_method("nearest-label", modality), run)[0]
    overall = _result(outcome.result)["overall"]
    assert overall["n"] == images
    # within one image: one image changes accuracy by 1/n and MAE by at most 29/n
    assert abs(overall["accuracy"] - accuracy) * images <= 1
    assert abs(overall["mae"] - mae) <= 0.005 + 1 / images


# --- a training method: train on the fold, export, evaluate the bundle -----------------------

TINY_CONFIG = """\
name: tiny-cnn
data: {natural: null, modality: pc, natural_only: true, labelled_fraction: 1.0}
model: {base_channels: 4, latent_dim: 8, regressor_hidden: [8]}
loss: {rec_weight: 0, kl_weight: 0, decoder_off: true}
train: {epochs: 1, steps_per_epoch: 2, batch_size: 4, early_stopping_patience: null,
        precision: fp32}
"""


@pytest.fixture(scope="module")
def model_fold(
    fake_root: Path, fake_folds: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("model")
    config = folder / "tiny-cnn.yaml"
    config.write_text(TINY_CONFIG, encoding="utf-8")
    run = ProtocolRun(folder / "out", str(fake_root))
    run.fold_file, run.fold_file_path = load_folds(fake_folds), fake_folds
    method = resolve_method(str(config), None)
    outcome = run_protocol("chamber-cv", method, run, folds=[0])[0]
    return {"run": run, "method": method, "outcome": outcome, "result": _result(outcome.result)}


@pytest.mark.slow
def test_chamber_cv_trains_on_the_fold_and_evaluates_the_bundle(
    model_fold: dict[str, Any], fake_folds: Path
) -> None:
    from twinvae.config import ExperimentConfig

    result, unit = model_fold["result"], model_fold["outcome"].unit
    assert (result["protocol"], result["method"], result["fold"]) == ("chamber-cv", "tiny-cnn", 0)
    assert result["method_kind"] == "model" and result["folds"] == 2
    held_out = set(load_folds(fake_folds).folds[0])
    assert set(result["chambers"]["test"]) == held_out
    assert set(result["chambers"]["validation"]) < set(result["chambers"]["train"])
    assert not set(result["chambers"]["train"]) & held_out
    trained = ExperimentConfig.model_validate(
        yaml.safe_load((unit.run / "config.yaml").read_text())
    )
    assert trained.data.natural == str(unit.train_csv)
    # the recorded command writes exactly the recorded evaluation of the bundle
    command = result["commands"]["evaluate"].split()[1:]
    again = unit.root / "again.json"
    command[command.index("--json") + 1] = str(again)
    assert runner.invoke(app, command).exit_code == 0
    assert again.read_bytes() == unit.eval_json.read_bytes()
    assert result["overall"] == json.loads(again.read_text())["overall"]


@pytest.mark.slow
def test_a_finished_fold_is_not_run_again(model_fold: dict[str, Any]) -> None:
    unit = model_fold["outcome"].unit
    before = unit.result.read_bytes()
    logged: list[str] = []
    model_fold["run"].log = logged.append
    run_protocol("chamber-cv", model_fold["method"], model_fold["run"], folds=[0])
    assert any("up to date" in line for line in logged)
    assert unit.result.read_bytes() == before


@pytest.mark.slow
def test_predict_keeps_chamber_and_frame(model_fold: dict[str, Any], fake_root: Path) -> None:
    from twinvae.export.predict import predict_to_csv

    bundle = model_fold["outcome"].unit.bundle
    images = sorted((fake_root / "pc" / "test").glob("*.png"))[:2]
    out = predict_to_csv(bundle, images, fake_root.parent / "counts.csv", overwrite=True).out
    rows = out.read_text().splitlines()
    assert rows[0] == "file,count,count_rounded,chamber,frame"
    assert [row.split(",")[-2:] for row in rows[1:]] == [
        ["nd001_crop/xy01", "1"],
        ["nd001_crop/xy01", "2"],
    ]


@pytest.mark.slow
def test_an_image_only_model_reuses_its_paper_split_run_when_anchored(
    model_fold: dict[str, Any],
) -> None:
    run, method = model_fold["run"], model_fold["method"]
    anchored = _result(run_protocol("anchored", method, run)[0].result)
    paper = _result(run.out / "paper-split/pc/tiny-cnn/split/result.json")
    assert (anchored["protocol"], paper["protocol"]) == ("anchored", "paper-split")
    assert anchored["overall"] == paper["overall"] and anchored["uses_anchors"] is False
    assert anchored["same_as"] == str(run.out / "paper-split/pc/tiny-cnn/split/result.json")
    assert "twinvae protocol anchored" in anchored["commands"]["result"]
    assert paper["data"]["test_csv"].endswith("pc/test.csv")
