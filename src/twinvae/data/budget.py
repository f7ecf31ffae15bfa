"""A label budget: keep N labelled images, optionally from a few chambers, drop the other labels.

For few-label experiments ("10 labelled frames from two chambers"): the images whose labels are
dropped stay in the set as unlabelled images (count 0), as the unlabelled frames of a real
experiment would. The choice is seeded: the same seed keeps the same images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from twinvae.data.imageset import ImageSet
from twinvae.data.splits import image_time_points
from twinvae.errors import ConfigError, DataError

_SEED_STREAM = 0x1AB
"""Mixed into the seed, so that the budget draws apart from the validation split's order."""


@dataclass(frozen=True)
class BudgetResult:
    """The set with the budget applied, and what was kept."""

    images: ImageSet
    kept: dict[str, int]
    """Labelled images kept per chamber ("" when chambers were not asked for)."""
    dropped: int

    def describe(self) -> str:
        where = (
            ", ".join(f"{chamber} ({count})" for chamber, count in self.kept.items())
            if "" not in self.kept
            else "all chambers"
        )
        return (
            f"label budget: kept {sum(self.kept.values())} labelled images from {where}; the "
            f"labels of {self.dropped} others were dropped (they stay as unlabelled images)"
        )


def _chambers(image_set: ImageSet) -> list[str]:
    points = image_time_points(image_set)
    missing = [name for name, point in zip(image_set.names, points, strict=True) if point is None]
    if missing:
        raise DataError(
            f"{image_set.source or 'natural set'}: data.label_chambers needs each image's "
            f"chamber, but {missing[0]!r} names none; use microscope export names "
            "(<experiment>xy<position>t<frame>c1) or a counts.csv with chamber,frame columns"
        )
    return [point[0] for point in points if point is not None]


def _quotas(budget: int, available: list[int]) -> list[int]:
    """The budget shared out as evenly as the labels of each chamber allow."""
    quotas = [0] * len(available)
    left = budget
    while left > 0:
        open_chambers = [i for i in range(len(available)) if quotas[i] < available[i]]
        if not open_chambers:
            break
        share = max(1, left // len(open_chambers))
        for index in open_chambers:
            step = min(share, available[index] - quotas[index], left)
            quotas[index] += step
            left -= step
            if left == 0:
                break
    return quotas


def apply_label_budget(
    image_set: ImageSet,
    budget: int,
    chambers: int | Sequence[str] | None = None,
    seed: int = 0,
) -> BudgetResult:
    """Keep ``budget`` labelled images (from ``chambers``: how many, or which), drawn with
    ``seed``; every other labelled image becomes unlabelled."""
    if budget < 1:
        raise ConfigError(f"data.label_budget must be at least 1, got {budget}")
    rng = np.random.default_rng([seed, _SEED_STREAM])
    labelled = np.flatnonzero(image_set.labelled)
    source = image_set.source or "natural set"
    if chambers is None:
        if budget > len(labelled):
            raise DataError(
                f"{source}: data.label_budget={budget}, but only {len(labelled)} images are "
                "labelled"
            )
        keep = np.sort(rng.choice(labelled, size=budget, replace=False))
        kept = {"": budget}
    else:
        names = np.array(_chambers(image_set))
        by_chamber = {
            chamber: labelled[names[labelled] == chamber]
            for chamber in sorted(set(names[labelled]))
        }
        chosen = _choose_chambers(by_chamber, budget, chambers, source, rng)
        available = [len(by_chamber[chamber]) for chamber in chosen]
        quotas = _quotas(budget, available)
        if sum(quotas) < budget:
            raise DataError(
                f"{source}: data.label_budget={budget}, but the chambers "
                f"{', '.join(chosen)} hold only {sum(available)} labelled images"
            )
        parts = [
            rng.choice(by_chamber[chamber], size=quota, replace=False)
            for chamber, quota in zip(chosen, quotas, strict=True)
        ]
        keep = np.sort(np.concatenate(parts))
        kept = {chamber: quota for chamber, quota in zip(chosen, quotas, strict=True)}
    counts = image_set.counts.copy()
    dropped = np.setdiff1d(labelled, keep)
    counts[dropped] = 0
    budgeted = image_set.subset(np.arange(len(image_set)))
    budgeted.counts = counts
    return BudgetResult(images=budgeted, kept=kept, dropped=len(dropped))


def _choose_chambers(
    by_chamber: dict[str, np.ndarray],
    budget: int,
    chambers: int | Sequence[str],
    source: str,
    rng: np.random.Generator,
) -> list[str]:
    """The chambers named, or ``chambers`` of those with enough labels, drawn with the seed."""
    known = ", ".join(by_chamber) or "none"
    if not isinstance(chambers, int):
        unknown = [chamber for chamber in chambers if chamber not in by_chamber]
        if unknown:
            raise DataError(
                f"{source}: data.label_chambers names {', '.join(unknown)}, which hold no "
                f"labelled image; chambers with labels: {known}"
            )
        return list(dict.fromkeys(chambers))
    needed = math.ceil(budget / chambers)
    candidates = [chamber for chamber, index in by_chamber.items() if len(index) >= needed]
    if len(candidates) < chambers:
        raise DataError(
            f"{source}: data.label_chambers={chambers} with data.label_budget={budget} needs "
            f"{chambers} chambers with at least {needed} labelled images each; "
            f"{len(candidates)} have that ({known}: "
            + ", ".join(str(len(index)) for index in by_chamber.values())
            + " labelled images)"
        )
    order = rng.permutation(len(candidates))
    return sorted(candidates[int(i)] for i in order[:chambers])
