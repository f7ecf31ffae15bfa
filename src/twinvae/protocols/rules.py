"""Image-free baselines: what a count can be guessed to be without looking at the image.

- `training_mean`: the mean labelled count of the training data, for every image;
- `nearest_label`: the label of the nearest labelled training frame of the same chamber (the
  earlier one when two are equally near);
- `interpolate_label`: the labels of the same chamber's training frames linearly interpolated
  over time (held constant before the first and after the last).

The last two need labelled frames of the chamber being counted, so they apply to the anchored
protocol only. A chamber without any labelled training frame falls back to the training mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from twinvae.errors import DataError


@dataclass(frozen=True)
class Anchor:
    """A labelled training frame: its chamber, time and count."""

    chamber: str
    frame: int
    count: int


def _mean(anchors: Sequence[Anchor]) -> float:
    if not anchors:
        raise DataError("no labelled training frame to take a mean or an anchor from")
    return float(np.mean([a.count for a in anchors]))


def training_mean(anchors: Sequence[Anchor], targets: Sequence[tuple[str, int]]) -> np.ndarray:
    """The mean labelled training count for every (chamber, frame) target."""
    return np.full(len(targets), _mean(anchors), dtype=np.float64)


def _by_chamber(anchors: Sequence[Anchor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per chamber: frames (sorted) and their counts; a frame labelled twice keeps its mean."""
    grouped: dict[str, dict[int, list[int]]] = {}
    for anchor in anchors:
        grouped.setdefault(anchor.chamber, {}).setdefault(anchor.frame, []).append(anchor.count)
    table = {}
    for chamber, frames in grouped.items():
        times = np.array(sorted(frames), dtype=np.float64)
        counts = np.array([np.mean(frames[int(t)]) for t in times], dtype=np.float64)
        table[chamber] = (times, counts)
    return table


ChamberRule = Callable[[np.ndarray, np.ndarray, int], float]
"""A count from one chamber's labelled frames (sorted times, their counts) at a target frame."""


def _per_chamber(
    anchors: Sequence[Anchor], targets: Sequence[tuple[str, int]], rule: ChamberRule
) -> np.ndarray:
    """``rule`` on each target's chamber; the training mean where the chamber has no label."""
    fallback = _mean(anchors)
    table = _by_chamber(anchors)
    predictions = np.empty(len(targets), dtype=np.float64)
    for index, (chamber, frame) in enumerate(targets):
        if chamber not in table:
            predictions[index] = fallback
            continue
        times, counts = table[chamber]
        predictions[index] = rule(times, counts, frame)
    return predictions


def _nearest(times: np.ndarray, counts: np.ndarray, frame: int) -> float:
    distance = np.abs(times - frame)
    return float(counts[int(np.argmin(distance))])  # argmin: first = earlier frame


def _interpolated(times: np.ndarray, counts: np.ndarray, frame: int) -> float:
    return float(np.interp(frame, times, counts))


def nearest_label(anchors: Sequence[Anchor], targets: Sequence[tuple[str, int]]) -> np.ndarray:
    """The count of the nearest labelled frame of the same chamber (ties: the earlier frame)."""
    return _per_chamber(anchors, targets, _nearest)


def interpolate_label(anchors: Sequence[Anchor], targets: Sequence[tuple[str, int]]) -> np.ndarray:
    """The same chamber's labels linearly interpolated at the target frame."""
    return _per_chamber(anchors, targets, _interpolated)
