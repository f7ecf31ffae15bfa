"""PNG figures of the protocol report (matplotlib's Agg canvas; no pyplot global state).

- error per true count (paper Fig. 14): MAE and MRE of the rounded count per true count;
- predicted against true count, with the diagonal and the least-squares line;
- counts over time in a few held-out chambers: labels and every method's predictions.

Every figure is drawn from prediction rows as `twinvae evaluate` writes them (``count``,
``predicted``, ``chamber``, ``frame``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinvae.evaluation.metrics import metrics_per_count, paper_metrics
from twinvae.experiments.figures import new_figure, save_figure

DPI = 80
"""Small files: the figures are committed beside RESULTS.md."""


@dataclass(frozen=True)
class Series:
    """One method's predictions under one protocol (cross-validation folds pooled)."""

    label: str
    rows: list[dict[str, Any]]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """True counts and unrounded predictions."""
        truth = np.array([row["count"] for row in self.rows], dtype=np.float64)
        predicted = np.array([row["predicted"] for row in self.rows], dtype=np.float64)
        return truth, predicted


def plot_error_per_count(
    panels: Sequence[tuple[str, Sequence[Series]]], title: str, path: Path
) -> Path:
    """One column per (title, series) panel: MAE (top) and MRE in percent (bottom) of the
    rounded count over the true count, one line per method."""
    figure = new_figure(4.2 * len(panels), 6.0, dpi=DPI)
    figure.suptitle(title)
    grid = figure.subplots(2, len(panels), squeeze=False, sharex=True)
    for column, (panel_title, series) in enumerate(panels):
        for row, (key, scale, label) in enumerate(
            (("mae", 1.0, "MAE (cells)"), ("mre", 100.0, "MRE (%)"))
        ):
            axes = grid[row][column]
            for one in series:
                truth, predicted = one.arrays()
                per_count = metrics_per_count(predicted, truth)
                counts = sorted(per_count)
                values = [scale * per_count[c][key] for c in counts]
                axes.plot(counts, values, marker="o", markersize=2.5, linewidth=1, label=one.label)
            axes.grid(alpha=0.3)
            axes.set_ylabel(label)
            if row == 0:
                axes.set_title(panel_title, fontsize=10)
            else:
                axes.set_xlabel("true cell count")
        if series:
            grid[0][column].legend(fontsize=7)
    return save_figure(figure, path)


def plot_scatter(series: Sequence[Series], title: str, path: Path) -> Path:
    """Predicted (unrounded) against true count per method, with the diagonal and the fitted
    least-squares line (the report's slope and intercept)."""
    columns = min(3, max(1, len(series)))
    rows = (len(series) + columns - 1) // columns
    figure = new_figure(3.3 * columns, 3.1 * max(rows, 1), dpi=DPI)
    figure.suptitle(title)
    grid = figure.subplots(max(rows, 1), columns, squeeze=False)
    for index, one in enumerate(series):
        axes = grid[index // columns][index % columns]
        truth, predicted = one.arrays()
        metrics = paper_metrics(predicted, truth)
        top = float(max(truth.max(), predicted.max(), 1.0)) + 1.0
        low = min(0.0, float(predicted.min()) - 1.0)
        axes.scatter(truth, predicted, s=6, alpha=0.4, linewidths=0)
        axes.plot([0, top], [0, top], color="grey", linewidth=0.8, label="predicted = true")
        if "slope" in metrics:
            xs = np.array([0.0, top])
            axes.plot(
                xs,
                metrics["slope"] * xs + metrics["intercept"],
                color="C3",
                linewidth=1.2,
                label=f"fit: {metrics['slope']:.2f} x + {metrics['intercept']:.2f}",
            )
        axes.set_xlim(0, top)
        axes.set_ylim(low, top)
        axes.set_title(f"{one.label}\nMAE {metrics['mae']:.2f}, n = {metrics['n']}", fontsize=8)
        axes.set_xlabel("true count", fontsize=8)
        axes.set_ylabel("predicted count", fontsize=8)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6, loc="upper left")
    for index in range(len(series), rows * columns):
        grid[index // columns][index % columns].set_visible(False)
    return save_figure(figure, path)


def pick_chambers(rows: Sequence[dict[str, Any]], count: int = 3) -> list[str]:
    """``count`` chambers with many labelled frames, spread from low to high counts: of the
    chambers with at least half the frames of the best-covered one, the lowest, the median
    and the highest mean count."""
    frames: dict[str, list[int]] = {}
    for row in rows:
        if row.get("chamber") is not None and row.get("frame") is not None:
            frames.setdefault(str(row["chamber"]), []).append(int(row["count"]))
    if not frames:
        return []
    most = max(len(v) for v in frames.values())
    covered = sorted(
        (name for name, counts in frames.items() if len(counts) >= most / 2),
        key=lambda name: (float(np.mean(frames[name])), name),
    )
    if len(covered) <= count:
        return covered
    picks = np.linspace(0, len(covered) - 1, count).round().astype(int)
    return [covered[i] for i in sorted(set(picks.tolist()))]


def plot_time_course(
    labels: Sequence[dict[str, Any]],
    series: Sequence[Series],
    chambers: Sequence[str],
    title: str,
    path: Path,
) -> Path:
    """One panel per chamber: the labels (dots) and each method's predictions over the frame."""
    figure = new_figure(4.2 * max(len(chambers), 1), 3.4, dpi=DPI)
    figure.suptitle(title)
    grid = figure.subplots(1, max(len(chambers), 1), squeeze=False)
    for index, chamber in enumerate(chambers):
        axes = grid[0][index]
        mine = sorted(
            (r for r in labels if r.get("chamber") == chamber), key=lambda r: int(r["frame"])
        )
        axes.scatter(
            [r["frame"] for r in mine],
            [r["count"] for r in mine],
            s=10,
            color="black",
            zorder=3,
            label="label",
        )
        for one in series:
            points = sorted(
                (r for r in one.rows if r.get("chamber") == chamber),
                key=lambda r: int(r["frame"]),
            )
            axes.plot(
                [r["frame"] for r in points],
                [r["predicted"] for r in points],
                linewidth=1,
                label=one.label,
            )
        axes.set_title(chamber, fontsize=9)
        axes.set_xlabel("frame")
        axes.set_ylabel("cells")
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=6)
    return save_figure(figure, path)
