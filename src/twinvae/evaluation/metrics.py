"""Counting metrics: the papers' definitions on rounded counts, diagnostics, and growth rates.

The papers report MAE and MRE of the *rounded* count and accuracy as "rounded count equals the
label"; `paper_metrics` computes exactly these as ``mae``, ``mre`` and ``accuracy`` and adds the
unrounded errors, accuracy within one cell, the least-squares line of prediction on truth and
the number of negative predictions. `METRIC_DEFINITIONS` says what every key means; reports
carry it so that each number names its definition. `growth_report` fits the growth rate of
every chamber of a time-lapse from the labels and from the predictions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS_FORMAT = "twinvae-metrics/2"
"""Version of the metric definitions below (1: MAE and MRE of unrounded predictions)."""

METRIC_DEFINITIONS: dict[str, str] = {
    "n": "labelled images evaluated",
    "mae": "paper definition: mean |rounded prediction - true count|",
    "mre": "paper definition: mean |rounded prediction - true count| / true count",
    "accuracy": "paper definition: share of images whose rounded prediction equals the true count",
    "within_one": "share of images whose rounded prediction is within 1 of the true count",
    "mae_unrounded": "mean |prediction - true count| (prediction not rounded)",
    "mre_unrounded": "mean |prediction - true count| / true count (prediction not rounded)",
    "bias": "mean (prediction - true count), prediction not rounded",
    "slope": "slope of the least-squares line prediction = slope * true count + intercept "
    "(predictions not rounded; absent when all true counts are equal)",
    "intercept": "intercept of that line",
    "negative": "number of predictions below 0 (not rounded)",
}
ROUNDING = "half up: 2.5 -> 3 (numpy.floor(x + 0.5))"

MIN_GROWTH_FRAMES = 3
"""A chamber needs this many labelled frames (at distinct times) for a growth-rate fit."""
GROWTH_DEFINITIONS: dict[str, str] = {
    "rate": "growth rate per frame: slope of the least-squares line log(count) = a + rate * "
    f"frame over the chamber's labelled frames (at least {MIN_GROWTH_FRAMES})",
    "rate_true": "that fit to the labels",
    "rate_predicted": "that fit to the predictions on the same frames (rounded, at least 1, "
    "since a labelled frame holds a cell and log needs a positive count)",
    "doubling_time": "ln 2 / rate, in frames (null when the rate is not positive)",
    "relative_error": "|rate_predicted - rate_true| / |rate_true| (null when rate_true is 0)",
    "doubling_time_relative_error": "|doubling time predicted - true| / true doubling time "
    "(null unless both rates are positive)",
}


def round_counts(predictions: np.ndarray) -> np.ndarray:
    """Round half up (2.5 -> 3), the rounding used for accuracy and for `count_rounded`."""
    return np.floor(np.asarray(predictions, dtype=np.float64) + 0.5).astype(np.int64)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of y on x (x not constant); exactly 0 for constant y."""
    if np.ptp(y) == 0:  # the mean of equal floats need not equal them: no rounding noise here
        return 0.0, float(y[0])
    x_mean, y_mean = x.mean(), y.mean()
    slope = float(((x - x_mean) * (y - y_mean)).sum() / ((x - x_mean) ** 2).sum())
    return slope, float(y_mean - slope * x_mean)


def _checked(predictions: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(predictions, dtype=np.float64).ravel()
    true = np.asarray(truth, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predictions for {true.size} labels")
    if pred.size == 0:
        raise ValueError("no labelled images to evaluate")
    if np.any(true < 1):
        raise ValueError("true counts must be >= 1 (count 0 means 'not labelled')")
    return pred, true


def count_metrics(predictions: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Validation metrics for model selection during training (and watershed tuning).

    MAE and MRE of the unrounded predictions: a smoother signal to select checkpoints on than
    the rounded counts; accuracy: rounded prediction == true. Reports use `paper_metrics`.
    Only labelled images (true count >= 1) may be passed; MRE is undefined for 0.
    """
    pred, true = _checked(predictions, truth)
    error = np.abs(pred - true)
    return {
        "n": int(pred.size),
        "mae": float(error.mean()),
        "mre": float((error / true).mean()),
        "accuracy": float((round_counts(pred) == true).mean()),
    }


def paper_metrics(predictions: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The papers' MAE, MRE and accuracy on rounded counts plus the diagnostics of
    `METRIC_DEFINITIONS` (slope and intercept only when the true counts differ)."""
    pred, true = _checked(predictions, truth)
    rounded = round_counts(pred).astype(np.float64)
    error = np.abs(rounded - true)
    raw_error = np.abs(pred - true)
    metrics: dict[str, float] = {
        "n": int(pred.size),
        "mae": float(error.mean()),
        "mre": float((error / true).mean()),
        "accuracy": float((error == 0).mean()),
        "within_one": float((error <= 1).mean()),
        "mae_unrounded": float(raw_error.mean()),
        "mre_unrounded": float((raw_error / true).mean()),
        "bias": float((pred - true).mean()),
        "negative": int(np.count_nonzero(pred < 0)),
    }
    if np.ptp(true) > 0:
        metrics["slope"], metrics["intercept"] = _line(true, pred)
    return metrics


def metrics_per_count(predictions: np.ndarray, truth: np.ndarray) -> dict[int, dict[str, float]]:
    """`paper_metrics` for every true count that occurs (paper Fig. 14)."""
    pred = np.asarray(predictions, dtype=np.float64).ravel()
    true = np.asarray(truth).ravel().astype(np.int64)
    return {
        int(count): paper_metrics(pred[true == count], true[true == count])
        for count in np.unique(true)
    }


def evaluation_report(predictions: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Overall and per-count metrics in one JSON-ready dict, with their definitions."""
    return {
        "metrics_format": METRICS_FORMAT,
        "definitions": {**METRIC_DEFINITIONS, "rounding": ROUNDING},
        "overall": paper_metrics(predictions, truth),
        "per_count": {str(k): v for k, v in metrics_per_count(predictions, truth).items()},
    }


# --- growth over time ------------------------------------------------------------------------


def growth_rate(frames: np.ndarray, counts: np.ndarray) -> float | None:
    """Slope of log(count) over frame by least squares; None with too few distinct frames."""
    times = np.asarray(frames, dtype=np.float64)
    values = np.asarray(counts, dtype=np.float64)
    if np.unique(times).size < MIN_GROWTH_FRAMES:
        return None
    if np.any(values <= 0):
        raise ValueError("growth rates need positive counts")
    return _line(times, np.log(values))[0]


def _doubling(rate: float | None) -> float | None:
    return math.log(2.0) / rate if rate is not None and rate > 0 else None


def _relative(estimate: float | None, reference: float | None) -> float | None:
    if estimate is None or reference is None or reference == 0:
        return None
    return abs(estimate - reference) / abs(reference)


def growth_report(
    predictions: np.ndarray,
    truth: np.ndarray,
    chambers: Sequence[str | None],
    frames: Sequence[int | None],
) -> dict[str, Any]:
    """Per chamber the growth rate and doubling time fitted to the labels and to the
    predictions on the same labelled frames, and the median and worst relative error.

    Images without a chamber or frame (None) are left out.
    """
    pred, true = _checked(predictions, truth)
    if not len(chambers) == len(frames) == pred.size:
        raise ValueError(f"{pred.size} predictions, {len(chambers)} chambers, {len(frames)} frames")
    predicted_counts = np.maximum(round_counts(pred), 1)
    per_chamber: dict[str, dict[str, Any]] = {}
    known = [i for i in range(pred.size) if chambers[i] is not None and frames[i] is not None]
    for chamber in sorted({str(chambers[i]) for i in known}):
        index = np.array([i for i in known if chambers[i] == chamber], dtype=int)
        times = np.array([frames[i] for i in index], dtype=np.float64)
        rate_true = growth_rate(times, true[index])
        rate_predicted = growth_rate(times, predicted_counts[index])
        doubling_true, doubling_predicted = _doubling(rate_true), _doubling(rate_predicted)
        per_chamber[chamber] = {
            "frames": int(index.size),
            "first_frame": int(times.min()),
            "last_frame": int(times.max()),
            "rate_true": rate_true,
            "rate_predicted": rate_predicted,
            "doubling_time_true": doubling_true,
            "doubling_time_predicted": doubling_predicted,
            "relative_error": _relative(rate_predicted, rate_true),
            "doubling_time_relative_error": _relative(doubling_predicted, doubling_true),
        }
    return {
        "definitions": GROWTH_DEFINITIONS,
        "summary": growth_summary(per_chamber),
        "per_chamber": per_chamber,
    }


def growth_summary(per_chamber: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Median and worst relative errors of rate and doubling time over the fitted chambers
    (also used to pool the chambers of several cross-validation folds)."""
    summary: dict[str, Any] = {
        "chambers": len(per_chamber),
        "fitted": sum(1 for c in per_chamber.values() if c["relative_error"] is not None),
    }
    for key in ("relative_error", "doubling_time_relative_error"):
        values = {name: c[key] for name, c in per_chamber.items() if c[key] is not None}
        worst = max(values, key=lambda name: values[name]) if values else None
        summary[f"median_{key}"] = float(np.median(list(values.values()))) if values else None
        summary[f"worst_{key}"] = values[worst] if worst is not None else None
        summary[f"worst_{key}_chamber"] = worst
    return summary
