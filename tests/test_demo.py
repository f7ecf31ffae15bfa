"""`twinvae demo` end to end with a tiny model (the real demo trains the quick-cpu size)."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twinvae.cli.main import app
from twinvae.demo import MARKER, prepare_out_dir
from twinvae.errors import DataError

TINY = [
    "model.base_channels=4", "model.latent_dim=8", "model.regressor_hidden=[8]",
    "train.epochs=1", "train.steps_per_epoch=2", "train.batch_size=8",
]  # fmt: skip


@pytest.mark.slow
def test_demo_makes_every_artifact(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--no-progress"]
    for item in TINY:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert {"run", "knime", "counts.csv", "twinvae-demo-pc.zip", MARKER} <= {
        p.name for p in out.iterdir()
    }
    with (out / "counts.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 160
    assert set(rows[0]) == {"file", "count", "count_rounded", "chamber", "frame"}
    with zipfile.ZipFile(out / "knime" / "TwinVAE_Count_Cells.knwf") as archive:
        names = archive.namelist()
    assert any(name.endswith("data/model.zip") for name in names)
    assert "MAE" in result.output


def test_demo_never_replaces_a_foreign_folder(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    with pytest.raises(DataError, match="not made by twinvae demo"):
        prepare_out_dir(mine, overwrite=True)
    assert (mine / "thesis.txt").read_text() == "precious"


def test_demo_replaces_its_own_output_only_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    prepare_out_dir(out, overwrite=False)
    (out / "old.txt").write_text("x")
    with pytest.raises(DataError, match="--overwrite"):
        prepare_out_dir(out, overwrite=False)
    prepare_out_dir(out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / MARKER).is_file()
