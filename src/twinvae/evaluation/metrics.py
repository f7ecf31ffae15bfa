"""Counting metrics of the papers: MAE, MRE and accuracy of rounded predictions."""

from __future__ import annotations

from typing import Any

import numpy as np


def round_counts(predictions: np.ndarray) -> np.ndarray:
    """Round half up (2.5 -> 3), the rounding used for accuracy and for `count_rounded`."""
    return np.floor(np.asarray(predictions, dtype=np.float64) + 0.5).astype(np.int64)


def count_metrics(predictions: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """MAE, MRE (mean of |pred - true| / true) and accuracy (rounded pred == true).

    Only labelled images (true count >= 1) may be passed; MRE is undefined for 0.
    """
    pred = np.asarray(predictions, dtype=np.float64).ravel()
    true = np.asarray(truth, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predictions for {true.size} labels")
    if pred.size == 0:
        raise ValueError("no labelled images to evaluate")
    if np.any(true < 1):
        raise ValueError("true counts must be >= 1 (count 0 means 'not labelled')")
    error = np.abs(pred - true)
    return {
        "n": float(pred.size),
        "mae": float(error.mean()),
        "mre": float((error / true).mean()),
        "accuracy": float((round_counts(pred) == true).mean()),
    }


def metrics_per_count(predictions: np.ndarray, truth: np.ndarray) -> dict[int, dict[str, float]]:
    """The same metrics for every true count that occurs (paper Fig. 14)."""
    pred = np.asarray(predictions, dtype=np.float64).ravel()
    true = np.asarray(truth).ravel().astype(np.int64)
    return {
        int(count): count_metrics(pred[true == count], true[true == count])
        for count in np.unique(true)
    }


def evaluation_report(predictions: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Overall and per-count metrics in one JSON-ready dict."""
    return {
        "overall": count_metrics(predictions, truth),
        "per_count": {str(k): v for k, v in metrics_per_count(predictions, truth).items()},
    }
