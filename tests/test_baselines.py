"""The watershed baseline: counting rendered cells, tuning, parameter files and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from _experiment_data import render_cells, write_fake_cho_k1
from twinvae.cli import experiment as experiment_cli
from twinvae.data.imageset import ImageSet
from twinvae.errors import ConfigError, DataError
from twinvae.evaluation.metrics import count_metrics, paper_metrics
from twinvae.experiments import baselines
from twinvae.experiments.baselines import WatershedParams

CENTRES = [(y, x) for y in (28, 52, 76, 100) for x in (28, 52, 76, 100)]


def _polarity(modality: str) -> str:
    return "dark" if modality == "bf" else "bright"


@pytest.mark.parametrize("modality", ["bf", "pc"])
@pytest.mark.parametrize("cells", [0, 1, 5, 16])
def test_counts_well_separated_rendered_cells(modality: str, cells: int) -> None:
    image = render_cells(CENTRES[:cells], modality)
    counted = baselines.count_cells(image, WatershedParams(polarity=_polarity(modality)))
    assert abs(counted - cells) <= 1


@pytest.mark.parametrize("modality", ["bf", "pc"])
def test_chamber_walls_are_not_counted(modality: str) -> None:
    image = render_cells(CENTRES[:5], modality, walls=True)
    with_removal = WatershedParams(polarity=_polarity(modality))
    without_removal = WatershedParams(polarity=_polarity(modality), line_length=0)
    assert baselines.count_cells(image, with_removal) == 5
    assert baselines.count_cells(image, without_removal) > 10


def _rendered_set(modality: str) -> tuple[np.ndarray, np.ndarray]:
    counts = np.array([1, 3, 6, 9, 12])
    images = np.stack([render_cells(CENTRES[:n], modality) for n in counts])
    return images, counts


def test_tuning_picks_the_better_parameter_set() -> None:
    images, counts = _rendered_set("pc")
    bad = WatershedParams(polarity="bright", min_size=5000)  # no region is that large
    good = WatershedParams(polarity="bright")
    result = baselines.tune_watershed(images, counts, [bad, good])
    assert result.params == good
    assert result.mae == pytest.approx(
        count_metrics(baselines.count_images(images, good), counts)["mae"]
    )
    assert [entry["mae"] for entry in result.search] == [
        pytest.approx(counts.mean()),  # the bad set counts nothing
        pytest.approx(result.mae),
    ]
    assert result.images == 5


def test_tuning_breaks_ties_by_order() -> None:
    images, counts = _rendered_set("bf")
    first = WatershedParams(polarity="dark")
    second = WatershedParams(polarity="dark", threshold_scale=1.01)
    assert baselines.tune_watershed(images, counts, [first, second]).params == first


def test_tuning_needs_labelled_images() -> None:
    images, counts = _rendered_set("bf")
    with pytest.raises(DataError, match="labelled"):
        baselines.tune_watershed(images, counts * 0, [WatershedParams()])


def test_grid_expansion_and_its_errors() -> None:
    combos = baselines.expand_grid({"min_size": [10, 20], "polarity": ["dark", "bright"]})
    assert len(combos) == 4
    assert {(c.min_size, c.polarity) for c in combos} == {
        (10, "dark"),
        (10, "bright"),
        (20, "dark"),
        (20, "bright"),
    }
    assert len(baselines.expand_grid(baselines.default_grid("pc"))) == 48
    with pytest.raises(ConfigError, match=r"unknown parameter.*min_sise"):
        baselines.expand_grid({"min_sise": [1]})
    with pytest.raises(ConfigError, match="non-empty lists"):
        baselines.expand_grid({"min_size": []})
    with pytest.raises(ConfigError, match=r"invalid value.*min_size"):
        baselines.expand_grid({"min_size": [-3]})


def test_parameter_file_round_trip_and_no_silent_overwrite(tmp_path: Path) -> None:
    images, counts = _rendered_set("pc")
    result = baselines.tune_watershed(images, counts, [WatershedParams(polarity="bright")])
    path = tmp_path / "watershed.json"
    grid = {"polarity": ["bright"]}
    baselines.save_params(path, result, modality="pc", grid=grid, tuned_on={"images": 5})
    assert baselines.load_params(path) == result.params
    stored = json.loads(path.read_text())
    assert stored["format"] == baselines.PARAMS_FORMAT
    assert stored["grid"] == grid
    assert stored["validation"]["mae"] == result.mae
    with pytest.raises(ConfigError, match="exists"):
        baselines.save_params(path, result, modality="pc", grid=grid, tuned_on={})
    broken = tmp_path / "broken.json"
    broken.write_text('{"min_size": "many"}')
    with pytest.raises(ConfigError, match="min_size"):
        baselines.load_params(broken)


def test_watershed_report_has_the_evaluate_layout(tmp_path: Path) -> None:
    images, counts = _rendered_set("bf")
    params = WatershedParams(polarity="dark")
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params.model_dump()))
    unlabelled = np.stack([render_cells(CENTRES[:2], "bf")])
    image_set = ImageSet(
        images=np.concatenate([images, unlabelled]),
        counts=np.concatenate([counts, [0]]),
        names=[f"img{i}.png" for i in range(6)],
        source="rendered",
    )
    report = baselines.watershed_report(path, image_set)
    predicted = baselines.count_images(images, params)
    assert report["overall"] == paper_metrics(predicted, counts)
    assert report["model"] == str(path) and report["data"] == "rendered"
    assert [p["file"] for p in report["predictions"]] == [f"img{i}.png" for i in range(5)]
    assert set(report["per_count"]) == {str(c) for c in counts}


def test_validation_set_is_the_chamber_split_of_train(tmp_path: Path) -> None:
    root = write_fake_cho_k1(tmp_path / "cho-k1", train_chambers=4, frames=4)
    validation = baselines.validation_set(root, "pc")
    assert len(validation) > 0 and (validation.counts > 0).all()
    chambers = {name.split("xy")[1][:2] for name in validation.names}
    assert len(chambers) == 1  # whole chambers only; 20 % of 4 chambers is one
    assert all(name.startswith("train/") for name in validation.names)


def test_watershed_cli_tune_then_evaluate(tmp_path: Path) -> None:
    root = write_fake_cho_k1(tmp_path / "cho-k1", train_chambers=4, frames=4)
    app = typer.Typer()
    experiment_cli.register(app)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"min_size": [10, 40]}))
    params, report = tmp_path / "ws.json", tmp_path / "report.json"
    runner = CliRunner()
    tuned = runner.invoke(
        app,
        [
            "watershed",
            "tune",
            "--modality",
            "pc",
            "--data-root",
            str(root),
            "--grid",
            str(grid),
            "--out",
            str(params),
        ],
    )
    assert tuned.exit_code == 0, tuned.output
    assert len(json.loads(params.read_text())["search"]) == 2
    again = runner.invoke(
        app,
        ["watershed", "tune", "--modality", "pc", "--data-root", str(root), "--out", str(params)],
    )
    assert isinstance(again.exception, ConfigError) and "exists" in str(again.exception)
    evaluated = runner.invoke(
        app,
        [
            "watershed",
            "evaluate",
            str(params),
            "--data",
            "Nat-PC-L-Te",
            "--data-root",
            str(root),
            "--json",
            str(report),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    data = json.loads(report.read_text())
    assert data["overall"]["n"] == 4  # 2 test chambers x 2 labelled (odd) frames
    assert "MAE" in evaluated.output
