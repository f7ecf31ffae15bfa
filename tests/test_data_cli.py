"""Tests of `summarize` and the `twinvae data info` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FolderMaker, chamber_rows
from twinvae.cli.main import app, main
from twinvae.data.imageset import ImageSet
from twinvae.data.readers import load_splits, summarize
from twinvae.errors import DataError

runner = CliRunner()


def test_summarize_counts_everything() -> None:
    images = np.zeros((5, 8, 8), np.uint8)
    images[0] = 255
    image_set = ImageSet(
        images=images,
        counts=np.array([0, 3, 3, 7, 0]),
        names=[
            "nd063_cropxy01t001c1.png",
            "nd063_cropxy01t002c1.png",
            "nd063_cropxy02t001c1.png",
            "nd037_cropxy01t001c1.png",
            "nd037_cropxy01t002c1.png",
        ],
        modality="pc",
    )
    summary = summarize(image_set)
    assert summary["images"] == 5
    assert (summary["labelled"], summary["unlabelled"]) == (3, 2)
    assert (summary["count_min"], summary["count_max"]) == (3, 7)
    assert summary["chambers"] == 3
    assert summary["mean_grey"] == pytest.approx(0.2)
    assert summary["histogram"] == {3: 2, 7: 1}
    assert summary["modality"] == "pc" and summary["skipped"] == 0
    json.dumps(summary)  # must be JSON-serialisable as is


def test_summarize_unlabelled_set_without_chamber_names() -> None:
    image_set = ImageSet(
        images=np.full((2, 4, 4), 51, np.uint8), counts=np.zeros(2), names=["a.png", "b.png"]
    )
    summary = summarize(image_set)
    assert summary["labelled"] == 0 and summary["count_min"] is None
    assert summary["chambers"] is None and summary["histogram"] == {}
    assert summary["mean_grey"] == pytest.approx(0.2)


def test_data_info_on_a_generic_folder(make_image_folder: FolderMaker) -> None:
    folder = make_image_folder(
        ["cell_a.png", "cell_b.png", "cell_c.tif"], counts={"cell_a.png": 2, "cell_c.tif": 12}
    )
    result = runner.invoke(app, ["data", "info", str(folder)])
    assert result.exit_code == 0, result.output
    assert "images" in result.output  # the set label is the folder name
    row = next(line for line in result.output.splitlines() if line.startswith("│ images"))
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[1:6] == ["3", "2", "1", "2..12", "-"]
    assert "Labelled images per cell count" in result.output
    assert "█" in result.output


def test_data_info_json(make_image_folder: FolderMaker) -> None:
    folder = make_image_folder(["a.png", "b.png"], counts={"b.png": 5})
    result = runner.invoke(app, ["data", "info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["images"]["labelled"] == 1
    assert payload["images"]["histogram"] == {"5": 1}


def test_data_info_on_a_cho_k1_tree(make_cho_k1_tree: FolderMaker) -> None:
    root = make_cho_k1_tree(chamber_rows(chambers=3, frames=4, labelled_every=2))
    result = runner.invoke(app, ["data", "info", str(root), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert list(payload) == ["pc/train"]
    assert payload["pc/train"]["chambers"] == 3
    assert payload["pc/train"]["labelled"] == 6 and payload["pc/train"]["split"] == "train"
    table = runner.invoke(app, ["data", "info", str(root / "pc"), "--split", "train"])
    assert table.exit_code == 0, table.output
    assert "Nat-PC-L-Tr" in table.output and "Nat-PC-U-Tr" in table.output


def test_data_info_skip_bad_reports_the_skipped_files(make_image_folder: FolderMaker) -> None:
    folder = make_image_folder(["a.png", "b.png"])
    (folder / "b.png").write_bytes(b"broken")
    failed = runner.invoke(app, ["data", "info", str(folder)])
    assert failed.exit_code != 0
    assert isinstance(failed.exception, DataError)
    result = runner.invoke(app, ["data", "info", str(folder), "--skip-bad", "--json"])
    assert result.exit_code == 0
    assert "b.png" in result.stderr and "skipped 1 bad input" in result.stderr
    assert json.loads(result.stdout)["images"]["skipped"] == 1


def test_data_info_error_is_one_red_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["twinvae", "data", "info", str(tmp_path / "empty")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "Error:" in error and "matches no known layout" in error
    assert "Traceback" not in error


def test_load_splits_filters_split_and_modality(make_cho_k1_tree: FolderMaker) -> None:
    root = make_cho_k1_tree(chamber_rows(chambers=2, frames=2), split="test")
    assert [named.label for named in load_splits(root)] == ["pc/test"]
    with pytest.raises(DataError, match=r"train\.csv: file not found"):
        load_splits(root, split="train")
    with pytest.raises(DataError, match="holds no bf data"):
        load_splits(root, modality="bf")


@pytest.mark.real_data
def test_data_info_on_real_cho_k1(cho_k1_root: Path) -> None:
    result = runner.invoke(app, ["data", "info", str(cho_k1_root / "pc"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert (payload["pc/train"]["labelled"], payload["pc/train"]["unlabelled"]) == (209, 2943)
    assert (payload["pc/test"]["labelled"], payload["pc/test"]["unlabelled"]) == (398, 394)
    assert payload["pc/train"]["chambers"] == 13


def test_data_info_cache_option(make_image_folder: FolderMaker, tmp_path: Path) -> None:
    folder = make_image_folder(["a.png", "b.png"], counts={"a.png": 1})
    cache = tmp_path / "decoded"
    for _ in range(2):
        result = runner.invoke(app, ["data", "info", str(folder), "--json", "--cache", str(cache)])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["images"]["labelled"] == 1
    assert len(list(cache.glob("decoded-*.npz"))) == 1
