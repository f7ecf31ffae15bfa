"""--skip-bad on train, transfer and evaluate, --resize on evaluate and predict, and how skips are
shown."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import FolderMaker, chamber_rows
from twinvae.cli.main import main
from twinvae.config import ExperimentConfig
from twinvae.models.twin_vae import ModelConfig, TwinVAE
from twinvae.training.checkpoint import Checkpoint, save_checkpoint

TINY = ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,))
TINY_TRAINING = [
    "model.base_channels=4",
    "model.latent_dim=8",
    "model.regressor_hidden=[8]",
    "train.epochs=1",
    "train.steps_per_epoch=1",
    "train.batch_size=4",
    "data.natural_only=true",
]
# What Python's own warning format looks like: "path/file.py:123: SomeWarning: ..."
RAW_WARNING = re.compile(r"\.py:\d+: \w*Warning")


def _run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: Any
) -> tuple[int, str]:
    """`twinvae ARGS` through the real entry point: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["twinvae", *(str(arg) for arg in args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 0), capsys.readouterr().err


def _labelled_folder(make_image_folder: FolderMaker, size: int = 128) -> Path:
    rows = chamber_rows(chambers=3, frames=4, labelled_every=1, prefix="nd063_crop")
    return make_image_folder([name for name, _ in rows], dict(rows), size=size)


def _break(folder: Path, name: str) -> None:
    (folder / name).write_bytes(b"not an image")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    state = TwinVAE(TINY).state_dict()
    config = ExperimentConfig(name="tiny-pc", model=TINY)
    save_checkpoint(Checkpoint(config=config, model_state=state, epoch=1, metrics={}), path)
    return path


def test_train_skip_bad_lists_each_skipped_file_once_in_plain_words(
    make_image_folder: FolderMaker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _labelled_folder(make_image_folder)
    broken = "nd063_cropxy02t003c1.png"
    _break(folder, broken)
    settings = [f"--set={item}" for item in [*TINY_TRAINING, f"data.natural={folder}"]]
    code, err = _run(
        monkeypatch, capsys, "train", *settings, "--out", tmp_path / "r1", "--no-progress"
    )
    assert code == 1 and broken in err and "Error:" in err  # without --skip-bad: stops
    code, err = _run(
        monkeypatch,
        capsys,
        "train",
        *settings,
        "--skip-bad",
        "--out",
        tmp_path / "r2",
        "--no-progress",
    )
    assert code == 0, err
    assert err.count(broken) == 1 and "Warning: " in err and "skipped 1 bad input" in err
    assert not RAW_WARNING.search(err) and "warnings.warn" not in err
    saved = (tmp_path / "r2" / "config.yaml").read_text(encoding="utf-8")
    assert "skip_bad: true" in saved


def test_transfer_skip_bad_covers_every_stage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from twinvae.training import runner

    seen: list[ExperimentConfig] = []
    monkeypatch.setattr(
        runner, "run_transfer", lambda config, *args, **kwargs: seen.append(config) or []
    )
    code, err = _run(
        monkeypatch,
        capsys,
        "transfer",
        "--from", tmp_path / "source.pt",
        "--config", "double-transfer",
        "--set", "data.natural=a",
        "--set", "transfer.second_stage.data.natural=b",
        "--skip-bad",
    )  # fmt: skip
    assert code == 0, err
    (config,) = seen
    assert config.data.skip_bad
    assert config.transfer is not None and config.transfer.second_stage is not None
    assert config.transfer.second_stage.data.skip_bad


def test_evaluate_skip_bad(
    checkpoint: Path,
    make_image_folder: FolderMaker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _labelled_folder(make_image_folder)
    broken = "nd063_cropxy01t002c1.png"
    _break(folder, broken)
    report = tmp_path / "report.json"
    code, err = _run(
        monkeypatch, capsys, "evaluate", checkpoint, "--data", folder, "--json", report
    )
    assert code == 1 and broken in err and not report.exists()
    code, err = _run(
        monkeypatch,
        capsys,
        "evaluate",
        checkpoint,
        "--data",
        folder,
        "--skip-bad",
        "--json",
        report,
    )
    assert code == 0, err
    assert err.count(broken) == 1 and "Warning: " in err and not RAW_WARNING.search(err)
    assert json.loads(report.read_text(encoding="utf-8"))["overall"]["n"] == 11


def test_evaluate_resize(
    checkpoint: Path,
    make_image_folder: FolderMaker,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _labelled_folder(make_image_folder, size=64)
    code, err = _run(monkeypatch, capsys, "evaluate", checkpoint, "--data", folder)
    assert code == 1 and "64x64" in err and "--resize" in err
    code, err = _run(monkeypatch, capsys, "evaluate", checkpoint, "--data", folder, "--resize")
    assert code == 0, err


def test_predict_names_resize_for_an_image_of_another_size(
    make_image_folder: FolderMaker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from twinvae.knime.testkit import write_mean_intensity_bundle

    bundle = write_mean_intensity_bundle(tmp_path / "model.zip")
    folder = make_image_folder(["small.png"], size=64)
    out = tmp_path / "counts.csv"
    code, err = _run(monkeypatch, capsys, "predict", bundle, folder, "--out", out)
    assert code == 1 and "64x64" in err and "--resize" in err  # the option that helps
    assert not out.exists()
    code, err = _run(monkeypatch, capsys, "predict", bundle, folder, "--out", out, "--resize")
    assert code == 0, err
    assert out.read_text(encoding="utf-8").count("small.png") == 1


def test_plain_warnings_leave_other_warnings_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import warnings

    from twinvae.cli.notices import plain_warnings
    from twinvae.errors import SkippedInputWarning

    passed_on: list[type[Warning]] = []
    monkeypatch.setattr(
        warnings, "showwarning", lambda m, category, *a, **k: passed_on.append(category)
    )
    with warnings.catch_warnings(), plain_warnings():
        warnings.simplefilter("always")
        warnings.warn(SkippedInputWarning("x.png: file is empty"), stacklevel=1)
        warnings.warn(RuntimeWarning("from elsewhere"), stacklevel=1)
    assert capsys.readouterr().err == "Warning: x.png: file is empty\n"
    assert passed_on == [RuntimeWarning]  # other libraries' warnings keep Python's format
