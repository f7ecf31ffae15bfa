"""MAE, MRE and accuracy against hand-computed values."""

import numpy as np
import pytest

from twinvae.evaluation.metrics import count_metrics, evaluation_report, round_counts


def test_metrics_match_hand_computation() -> None:
    predicted = np.array([1.4, 2.6, 10.0, 4.5])
    true = np.array([1, 2, 8, 5])
    # errors 0.4, 0.6, 2.0, 0.5 -> MAE 3.5 / 4; relative 0.4, 0.3, 0.25, 0.1 -> MRE 1.05 / 4
    # rounded 1, 3, 10, 5 -> correct for images 1 and 4
    metrics = count_metrics(predicted, true)
    assert metrics["mae"] == pytest.approx(0.875)
    assert metrics["mre"] == pytest.approx(0.2625)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["n"] == 4


def test_rounding_is_half_up() -> None:
    assert round_counts(np.array([0.5, 1.5, 2.5, 2.49])).tolist() == [1, 2, 3, 2]


def test_per_count_report() -> None:
    report = evaluation_report(np.array([1.0, 1.6, 3.0]), np.array([1, 1, 3]))
    assert report["per_count"]["1"]["mae"] == pytest.approx(0.3)
    assert report["per_count"]["1"]["accuracy"] == pytest.approx(0.5)
    assert report["per_count"]["3"]["mae"] == pytest.approx(0.0)


def test_unlabelled_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="not labelled"):
        count_metrics(np.array([1.0]), np.array([0]))
    with pytest.raises(ValueError, match="no labelled"):
        count_metrics(np.array([]), np.array([]))
