"""The train / transfer / evaluate commands end to end on generated data (tiny model)."""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from twinvae.cli.main import app
from twinvae.data.imageset import ImageSet
from twinvae.data.writer import write_image_folder
from twinvae.training.checkpoint import load_checkpoint, load_model, save_checkpoint
from twinvae.training.errors import TrainingWarning

TINY = [
    "--set", "model.base_channels=4",
    "--set", "model.latent_dim=8",
    "--set", "model.regressor_hidden=[8]",
    "--set", "train.epochs=1",
    "--set", "train.steps_per_epoch=1",
    "--set", "train.batch_size=4",
    "--set", "data.generated_natural_count=40",
    "--set", "data.generated_natural_labelled=20",
]  # fmt: skip

runner = CliRunner()

# TINY's generated data leaves few validation images; one test checks that warning
pytestmark = pytest.mark.filterwarnings("ignore::twinvae.training.errors.TrainingWarning")


def _invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "source"
    _invoke("train", "--config", "quick-cpu", *TINY, "--out", run, "--no-progress")
    return run


def test_train_quick_cpu_writes_the_run_folder(source_run: Path) -> None:
    names = {p.name for p in source_run.iterdir()}
    assert {"config.yaml", "metrics.csv", "last.pt", "best.pt"} <= names
    assert load_checkpoint(source_run / "best.pt").config.name == "quick-cpu"


@pytest.mark.parametrize("strategy", ["simultaneous", "frozen-outer", "frozen-core", "thaw"])
def test_transfer_runs_every_strategy(source_run: Path, tmp_path: Path, strategy: str) -> None:
    out = tmp_path / strategy
    _invoke(
        "transfer", "--from", source_run / "best.pt", "--config", "quick-cpu",
        "--strategy", strategy, *TINY, "--out", out, "--no-progress",
    )  # fmt: skip
    config = load_checkpoint(out / "last.pt").config
    assert config.transfer is not None and config.transfer.strategy == strategy
    assert config.transfer.from_checkpoint == str(source_run / "best.pt")


def test_transfer_rejects_unknown_strategy(source_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["transfer", "--from", str(source_run / "best.pt"), "--strategy", "melt"]
    )
    assert result.exit_code != 0


def test_evaluate_reproduces_hand_computed_metrics(source_run: Path, tmp_path: Path) -> None:
    model, checkpoint = load_model(source_run / "best.pt")
    last = model.regressor[-1]
    with torch.no_grad():  # every image is now counted as exactly 3.4
        last.weight.zero_()
        last.bias.fill_(3.4)
    checkpoint.model_state = model.state_dict()
    constant = tmp_path / "constant.pt"
    save_checkpoint(checkpoint, constant)

    images = np.zeros((4, 128, 128), dtype=np.uint8)
    labelled = ImageSet(images, np.array([2, 3, 5, 0]), [f"i{i}.png" for i in range(4)])
    write_image_folder(labelled, tmp_path / "data")
    report_path = tmp_path / "report.json"
    _invoke("evaluate", constant, "--data", tmp_path / "data", "--json", report_path)
    overall = json.loads(report_path.read_text())["overall"]
    # labels 2, 3, 5 (the 0 is unlabelled); the paper's metrics use the rounded count 3:
    # errors 1, 0, 2, right once; unrounded errors 1.4, 0.4, 1.6
    assert overall["n"] == 3
    assert overall["mae"] == pytest.approx((1 + 0 + 2) / 3)
    assert overall["mre"] == pytest.approx((1 / 2 + 0 / 3 + 2 / 5) / 3)
    assert overall["accuracy"] == pytest.approx(1 / 3)
    assert overall["mae_unrounded"] == pytest.approx((1.4 + 0.4 + 1.6) / 3, abs=1e-5)
    assert overall["mre_unrounded"] == pytest.approx((1.4 / 2 + 0.4 / 3 + 1.6 / 5) / 3, abs=1e-5)


def test_evaluate_refuses_to_overwrite_a_report(source_run: Path, tmp_path: Path) -> None:
    existing = tmp_path / "report.json"
    existing.write_text("keep me")
    result = runner.invoke(
        app, ["evaluate", str(source_run), "--data", str(tmp_path), "--json", str(existing)]
    )
    assert result.exit_code != 0
    assert existing.read_text() == "keep me"


def test_resume_rejects_overrides_other_than_the_epochs(source_run: Path) -> None:
    result = runner.invoke(app, ["train", "--resume", str(source_run), "--set", "optim.lr=0.1"])
    assert result.exit_code == 1
    assert "optim.lr" in str(result.exception) and "train.epochs" in str(result.exception)


def test_resume_of_a_finished_run_says_so(source_run: Path) -> None:
    before = (source_run / "last.pt").stat().st_mtime_ns
    output = _invoke("train", "--resume", source_run, "--no-progress")
    assert "already complete" in output and "train.epochs" in output
    assert (source_run / "last.pt").stat().st_mtime_ns == before


def test_resume_extends_a_run_with_more_epochs(source_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(source_run, run)
    output = _invoke("train", "--resume", run, "--set", "train.epochs=2", "--no-progress")
    assert "already complete" not in output
    assert load_checkpoint(run / "last.pt").epoch == 1
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 2


def test_runs_started_in_the_same_second_get_their_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda *_: "20250101-000000")
    for _ in range(2):
        _invoke("train", "--config", "quick-cpu", *TINY, "--no-progress")
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    assert all((run / "last.pt").is_file() for run in runs)


def test_a_tiny_validation_split_is_one_clean_warning_line(tmp_path: Path) -> None:
    """TINY's generated data leaves a handful of labelled validation images."""
    from twinvae.cli.notices import plain_warnings  # what `twinvae` (cli.main) runs under

    with warnings.catch_warnings(), plain_warnings():
        warnings.simplefilter("default", TrainingWarning)  # over this module's "ignore"
        output = _invoke("train", "--config", "quick-cpu", *TINY, "--out", tmp_path / "run")
    lines = [line for line in output.splitlines() if "val_fraction" in line]
    assert len(lines) == 1 and lines[0].startswith("Warning: validation holds")
    assert "TrainingWarning" not in output and not re.search(r"\.py:\d+", output)  # not raw
