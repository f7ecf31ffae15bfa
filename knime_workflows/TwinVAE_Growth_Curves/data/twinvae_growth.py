"""Growth curves of cell counts in microfluidic chambers (time-lapse microscopy).

Self-contained (numpy, pandas; matplotlib for the plot) so that it can be shipped next to a KNIME
workflow. A time-lapse image is named ``<experiment>xy<position>t<frame>...`` (for example
``nd063_cropxy01t005c1.png`` = position 01, frame 005); one position is one chamber. Alternatively
a table gives file, position and frame.

Growth model: N(t) = N0 * exp(r * t), fitted per chamber by least squares on log(count) over the
frames with count > 0. ``r`` is the growth rate per frame (per hour when the frame interval is
known) and the doubling time is ln(2) / r.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import numpy as np
    import pandas as pd
except ImportError as error:  # pragma: no cover - depends on the user's environment
    missing = getattr(error, "name", None) or "numpy"
    raise ImportError(
        f"The Python package '{missing}' is missing. Install it with 'pip install {missing}' or "
        f"'conda install -c conda-forge {missing}' into the Python environment that runs this code "
        "(in KNIME: Preferences > KNIME > Python)."
    ) from error

__all__ = [
    "GrowthFit",
    "chamber_counts",
    "fit_all",
    "fit_exponential",
    "growth_plot_png",
    "parse_time_lapse_name",
    "read_position_table",
    "time_lapse_table",
]

_NAME_PATTERN = re.compile(r"xy(\d+)t(\d+)", re.IGNORECASE)
LN2 = math.log(2.0)


def parse_time_lapse_name(name: str) -> tuple[str, int, int]:
    """(experiment, position, frame) from a name like ``nd063_cropxy01t005c1.png``."""
    stem = Path(name).name
    matches = list(_NAME_PATTERN.finditer(stem))
    if not matches:
        raise ValueError(
            f"image name {name!r} does not contain 'xy<position>t<frame>' (for example "
            "'exp1xy01t005c1.png'); give a position/frame table instead"
        )
    match = matches[-1]
    return stem[: match.start()], int(match.group(1)), int(match.group(2))


def _chamber_name(experiment: str, position: int) -> str:
    return f"{experiment}xy{position:02d}"


def time_lapse_table(files: Iterable[str]) -> pd.DataFrame:
    """file, experiment, position, frame, chamber for each file name (sorted by chamber, frame)."""
    rows = []
    for file in files:
        experiment, position, frame = parse_time_lapse_name(file)
        rows.append(
            {
                "file": file,
                "experiment": experiment,
                "position": position,
                "frame": frame,
                "chamber": _chamber_name(experiment, position),
            }
        )
    table = pd.DataFrame(rows, columns=["file", "experiment", "position", "frame", "chamber"])
    return table.sort_values(["chamber", "frame", "file"], kind="stable").reset_index(drop=True)


def read_position_table(path: str | Path) -> pd.DataFrame:
    """A CSV with the columns file, position, frame (and optionally chamber, experiment)."""
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"position/frame table {source} does not exist")
    table = pd.read_csv(source)
    required = {"file", "position", "frame"}
    missing = required - set(table.columns)
    if missing:
        raise ValueError(
            f"position/frame table {source} lacks the columns {sorted(missing)}; it needs "
            "file, position, frame (optional: chamber, experiment)"
        )
    for column in ("position", "frame"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() | (values != values.round())
        if bad.any():
            line = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # header is line 1
            raise ValueError(f"{source} line {line}: {column} must be a whole number")
        table[column] = values.astype("int64")
    if "experiment" not in table.columns:
        table["experiment"] = ""
    table["experiment"] = table["experiment"].fillna("").astype(str)
    if "chamber" not in table.columns:
        table["chamber"] = [
            _chamber_name(exp, pos)
            for exp, pos in zip(table["experiment"], table["position"], strict=True)
        ]
    table["chamber"] = table["chamber"].astype(str)
    table["file"] = table["file"].astype(str)
    columns = ["file", "experiment", "position", "frame", "chamber"]
    return (
        table[columns]
        .sort_values(["chamber", "frame", "file"], kind="stable")
        .reset_index(drop=True)
    )


def chamber_counts(table: pd.DataFrame, count_column: str = "count") -> pd.DataFrame:
    """Counts per chamber and frame (summed when several images share a chamber and frame)."""
    missing = {"chamber", "frame", count_column} - set(table.columns)
    if missing:
        raise ValueError(f"the count table lacks the columns {sorted(missing)}")
    grouped = (
        table.groupby(["chamber", "frame"], sort=True)
        .agg(count=(count_column, "sum"), images=(count_column, "size"))
        .reset_index()
    )
    grouped["count"] = grouped["count"].astype("float64")
    grouped["images"] = grouped["images"].astype("int64")
    return grouped


@dataclass(frozen=True)
class GrowthFit:
    """Exponential growth fit of one chamber."""

    chamber: str
    points: int
    first_frame: int
    last_frame: int
    initial_count: float
    rate_per_frame: float
    doubling_time_frames: float
    rate_per_hour: float
    doubling_time_hours: float
    r_squared: float
    note: str


def fit_exponential(
    chamber: str,
    frames: Any,
    counts: Any,
    frame_interval_minutes: float | None = None,
) -> GrowthFit:
    """Log-linear least squares on the frames with count > 0."""
    frame_values = np.asarray(frames, dtype=np.float64)
    count_values = np.asarray(counts, dtype=np.float64)
    usable = np.isfinite(count_values) & (count_values > 0)
    x, y = frame_values[usable], np.log(count_values[usable])
    nan = math.nan
    if len(np.unique(x)) < 2:
        return GrowthFit(
            chamber,
            int(usable.sum()),
            int(frame_values.min()) if len(frame_values) else 0,
            int(frame_values.max()) if len(frame_values) else 0,
            nan,
            nan,
            nan,
            nan,
            nan,
            nan,
            "fewer than two frames with count > 0",
        )
    slope, intercept = np.polyfit(x, y, 1)
    fitted = intercept + slope * x
    residual = float(np.sum((y - fitted) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    r_squared = 1.0 - residual / total if total > 0 else 1.0
    rate = float(slope)
    doubling = LN2 / rate if rate > 0 else nan
    note = "" if rate > 0 else "no growth (rate <= 0): doubling time undefined"
    hours_per_frame = frame_interval_minutes / 60.0 if frame_interval_minutes else None
    rate_hour = rate / hours_per_frame if hours_per_frame else nan
    doubling_hours = doubling * hours_per_frame if hours_per_frame and rate > 0 else nan
    return GrowthFit(
        chamber=chamber,
        points=int(usable.sum()),
        first_frame=int(x.min()),
        last_frame=int(x.max()),
        initial_count=float(math.exp(intercept)),
        rate_per_frame=rate,
        doubling_time_frames=doubling,
        rate_per_hour=rate_hour,
        doubling_time_hours=doubling_hours,
        r_squared=float(r_squared),
        note=note,
    )


def fit_all(counts: pd.DataFrame, frame_interval_minutes: float | None = None) -> pd.DataFrame:
    """One row of fitted growth parameters per chamber (input: ``chamber_counts`` output)."""
    if frame_interval_minutes is not None and frame_interval_minutes <= 0:
        frame_interval_minutes = None
    fits = [
        fit_exponential(str(chamber), group["frame"], group["count"], frame_interval_minutes)
        for chamber, group in counts.groupby("chamber", sort=True)
    ]
    columns = list(GrowthFit.__dataclass_fields__)
    return pd.DataFrame([fit.__dict__ for fit in fits], columns=columns)


def growth_plot_png(counts: pd.DataFrame, fits: pd.DataFrame, columns: int = 4) -> bytes:
    """One panel per chamber: counts over frames (log scale) and the fitted exponential."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError as error:
        raise ImportError(
            "The Python package 'matplotlib' is missing (needed for the growth plot). Install it "
            "with 'pip install matplotlib' or 'conda install -c conda-forge matplotlib'."
        ) from error
    chambers = sorted(counts["chamber"].unique())
    if not chambers:
        raise ValueError("no chambers to plot")
    ncols = min(columns, len(chambers))
    nrows = math.ceil(len(chambers) / ncols)
    figure, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False, dpi=100
    )
    fit_by_chamber = {row.chamber: row for row in fits.itertuples(index=False)}
    for index, chamber in enumerate(chambers):
        axis = axes[index // ncols][index % ncols]
        data = counts[counts["chamber"] == chamber]
        positive = data[data["count"] > 0]
        axis.semilogy(positive["frame"], positive["count"], "o", markersize=3, label="count")
        fit = fit_by_chamber.get(chamber)
        if fit is not None and math.isfinite(fit.rate_per_frame):
            frames = np.linspace(data["frame"].min(), data["frame"].max(), 50)
            axis.semilogy(frames, fit.initial_count * np.exp(fit.rate_per_frame * frames), "-")
            doubling = fit.doubling_time_frames
            label = f"Td = {doubling:.1f} frames" if math.isfinite(doubling) else "no growth"
            if math.isfinite(fit.doubling_time_hours):
                label = f"Td = {fit.doubling_time_hours:.1f} h"
            axis.set_title(f"{chamber}\n{label}", fontsize=8)
        else:
            axis.set_title(f"{chamber}\n(no fit)", fontsize=8)
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("frame", fontsize=7)
        axis.set_ylabel("cells", fontsize=7)
        axis.tick_params(labelsize=6)
    for index in range(len(chambers), nrows * ncols):
        axes[index // ncols][index % ncols].axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()
