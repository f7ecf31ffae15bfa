"""Counting metrics against hand-computed values: the papers' definitions, diagnostics, growth."""

import math

import numpy as np
import pytest

from twinvae.data.imageset import ImageSet
from twinvae.evaluation.evaluate import prediction_report
from twinvae.evaluation.metrics import (
    METRIC_DEFINITIONS,
    count_metrics,
    evaluation_report,
    growth_report,
    paper_metrics,
    round_counts,
)

# predictions, labels; rounded (half up): 1, 3, 10, 5, -1
PREDICTED = np.array([1.4, 2.6, 10.0, 4.5, -0.6])
TRUE = np.array([1, 2, 8, 5, 1])


def test_paper_metrics_use_the_rounded_count() -> None:
    metrics = paper_metrics(PREDICTED, TRUE)
    # rounded errors 0, 1, 2, 0, 2 -> MAE 5 / 5; relative 0, 1/2, 2/8, 0, 2/1 -> MRE 2.75 / 5
    assert metrics["n"] == 5 and isinstance(metrics["n"], int)
    assert metrics["mae"] == pytest.approx(1.0)
    assert metrics["mre"] == pytest.approx(0.55)
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    assert metrics["within_one"] == pytest.approx(3 / 5)


def test_diagnostics_match_hand_computation() -> None:
    metrics = paper_metrics(PREDICTED, TRUE)
    # unrounded errors 0.4, 0.6, 2.0, 0.5, 1.6; relative 0.4, 0.3, 0.25, 0.1, 1.6
    assert metrics["mae_unrounded"] == pytest.approx(5.1 / 5)
    assert metrics["mre_unrounded"] == pytest.approx(2.65 / 5)
    assert metrics["bias"] == pytest.approx((0.4 + 0.6 + 2.0 - 0.5 - 1.6) / 5)
    assert metrics["negative"] == 1
    # true mean 3.4, predicted mean 3.58; sum dx*dy = 47.64, sum dx^2 = 37.2
    assert metrics["slope"] == pytest.approx(47.64 / 37.2)
    assert metrics["intercept"] == pytest.approx(3.58 - 47.64 / 37.2 * 3.4)
    assert set(metrics) <= set(METRIC_DEFINITIONS)


def test_slope_is_absent_for_one_true_count_and_zero_for_constant_predictions() -> None:
    assert "slope" not in paper_metrics(np.array([1.0, 2.0]), np.array([3, 3]))
    constant = paper_metrics(np.full(3, 9.7), np.array([1, 5, 9]))
    assert constant["slope"] == 0.0 and constant["intercept"] == pytest.approx(9.7)


def test_validation_metrics_stay_unrounded() -> None:
    metrics = count_metrics(PREDICTED, TRUE)
    assert metrics["mae"] == pytest.approx(5.1 / 5)
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    assert metrics["n"] == 5 and isinstance(metrics["n"], int)


def test_rounding_is_half_up() -> None:
    assert round_counts(np.array([0.5, 1.5, 2.5, 2.49, -0.6])).tolist() == [1, 2, 3, 2, -1]


def test_report_has_per_count_metrics_and_definitions() -> None:
    report = evaluation_report(np.array([1.0, 1.6, 3.0]), np.array([1, 1, 3]))
    assert report["per_count"]["1"]["mae"] == pytest.approx(0.5)  # rounded 1 and 2
    assert report["per_count"]["1"]["mae_unrounded"] == pytest.approx(0.3)
    assert report["per_count"]["1"]["accuracy"] == pytest.approx(0.5)
    assert report["per_count"]["3"]["mae"] == pytest.approx(0.0)
    assert "rounded" in report["definitions"]["mae"]
    assert "not rounded" in report["definitions"]["mae_unrounded"]


def test_unlabelled_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="not labelled"):
        paper_metrics(np.array([1.0]), np.array([0]))
    with pytest.raises(ValueError, match="no labelled"):
        count_metrics(np.array([]), np.array([]))


def _growth_fixture() -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    rows = [
        # chamber A doubles every 10 frames; predictions (rounded 2, 4, 16) every 20/3 frames
        ("A", 0, 2, 2.2),
        ("A", 10, 4, 3.6),
        ("A", 20, 8, 16.4),
        ("B", 1, 5, 5.0),  # B does not grow: no relative error
        ("B", 2, 5, 5.2),
        ("B", 3, 5, 4.9),
        ("C", 1, 3, 3.0),  # C has two frames: no fit
        ("C", 9, 6, 6.0),
        ("D", 0, 1, -0.3),  # D doubles every 5 frames; the rounded 0 counts as 1
        ("D", 5, 2, 2.0),
        ("D", 10, 4, 4.0),
    ]
    return (
        np.array([r[3] for r in rows]),
        np.array([r[2] for r in rows]),
        [r[0] for r in rows],
        [r[1] for r in rows],
    )


def test_growth_rates_and_doubling_times_match_hand_computation() -> None:
    predicted, true, chambers, frames = _growth_fixture()
    report = growth_report(predicted, true, chambers, frames)
    a = report["per_chamber"]["A"]
    assert a["rate_true"] == pytest.approx(math.log(2) / 10)
    assert a["rate_predicted"] == pytest.approx(3 * math.log(2) / 20)
    assert a["doubling_time_true"] == pytest.approx(10)
    assert a["doubling_time_predicted"] == pytest.approx(20 / 3)
    assert a["relative_error"] == pytest.approx(0.5)
    assert a["doubling_time_relative_error"] == pytest.approx(1 / 3)
    b, c, d = (report["per_chamber"][k] for k in "BCD")
    assert b["rate_true"] == 0.0 and b["relative_error"] is None
    assert b["doubling_time_true"] is None
    assert c["rate_true"] is None and c["frames"] == 2
    assert d["rate_predicted"] == pytest.approx(math.log(2) / 5)
    summary = report["summary"]
    assert summary["chambers"] == 4 and summary["fitted"] == 2
    assert summary["median_relative_error"] == pytest.approx(0.25)
    assert summary["worst_relative_error"] == pytest.approx(0.5)
    assert summary["worst_relative_error_chamber"] == "A"
    assert summary["median_doubling_time_relative_error"] == pytest.approx(1 / 6)


def test_prediction_report_keeps_chamber_and_frame() -> None:
    names = ["pc/nd063_cropxy01t003c1.png", "pc/nd063_cropxy01t008c1.png", "cell.png"]
    labelled = ImageSet(np.zeros((3, 4, 4), np.uint8), np.array([2, 3, 4]), names)
    report = prediction_report(np.array([2.0, 3.0, 4.0]), labelled, model="m")
    rows = report["predictions"]
    assert (rows[0]["chamber"], rows[0]["frame"]) == ("nd063_crop/xy01", 3)
    assert (rows[1]["chamber"], rows[1]["frame"]) == ("nd063_crop/xy01", 8)
    assert rows[2]["chamber"] is None and rows[2]["frame"] is None
    assert list(report["growth"]["per_chamber"]) == ["nd063_crop/xy01"]
    points: list[tuple[str, int] | None] = [("left", 1), None]
    given = ImageSet(
        np.zeros((2, 4, 4), np.uint8), np.array([1, 2]), ["a", "b"], time_points=points
    )
    rows = prediction_report(np.array([1.0, 2.0]), given, model="m")["predictions"]
    assert (rows[0]["chamber"], rows[0]["frame"]) == ("left", 1)
    assert rows[1]["chamber"] is None
