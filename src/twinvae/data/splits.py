"""Validation splits cut by microfluidic chamber, so correlated frames never straddle the cut.

Microscope export names look like `<experiment>xy<position>t<frame>c<channel>`, e.g.
`nd063_cropxy01t005c1.png`. Position numbers repeat across experiments, so a chamber is the
experiment together with the position ("nd063_crop/xy01"). Some exports have no `xy<position>`
part (e.g. `nd015_cropKond__bottom_9t002c1.jpg`); then the experiment alone is the chamber.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import PurePath
from typing import Literal

import numpy as np

from twinvae.data.imageset import ImageSet
from twinvae.errors import ConfigError, DataError, TwinVAEWarning

GroupBy = Literal["chamber", "file"]

_EXPORT_NAME = re.compile(
    r"^(?P<experiment>.+?)(?:xy(?P<position>\d+))?t(?P<frame>\d+)c\d+$", re.IGNORECASE
)
_EXPECTED = (
    "expected a microscope export name '<experiment>xy<position>t<frame>c<channel>' "
    "such as nd063_cropxy01t005c1.png"
)


def _stem(name: str) -> str:
    return PurePath(name).name.rsplit(".", 1)[0]


def _match(name: str) -> re.Match[str]:
    match = _EXPORT_NAME.match(_stem(name))
    if match is None:
        raise DataError(f"{name}: cannot tell its chamber from the file name; {_EXPECTED}")
    return match


def parse_chamber(name: str) -> str:
    """Chamber id "<experiment>/xy<position>" (or "<experiment>" without a position)."""
    match = _match(name)
    position = match["position"]
    return f"{match['experiment']}/xy{position}" if position else match["experiment"]


def parse_frame(name: str) -> int:
    """Frame (time point) number of a microscope export name."""
    return int(_match(name)["frame"])


def time_point(name: str) -> tuple[str, int] | None:
    """(chamber, frame) of a microscope export name, or None when the name does not follow it."""
    match = _EXPORT_NAME.match(PurePath(name).name.rsplit(".", 1)[0])
    if match is None:
        return None
    position = match["position"]
    chamber = f"{match['experiment']}/xy{position}" if position else match["experiment"]
    return chamber, int(match["frame"])


def image_time_points(image_set: ImageSet) -> list[tuple[str, int] | None]:
    """(chamber, frame) per image: as the data listed it, else told from the file name."""
    given = image_set.time_points or [None] * len(image_set)
    return [
        point if point is not None else time_point(name)
        for point, name in zip(given, image_set.names, strict=True)
    ]


def group_ids(names: Sequence[str], group_by: GroupBy = "chamber") -> list[str]:
    """One group id per name: its chamber, or the name itself for group_by="file"."""
    if group_by == "file":
        return list(names)
    if group_by != "chamber":
        raise ConfigError(f"group_by must be 'chamber' or 'file', got {group_by!r}")
    try:
        return [parse_chamber(name) for name in names]
    except DataError as error:
        raise DataError(
            f"{error}; or cut validation by file instead (--set data.split_by=file)"
        ) from None


def count_chambers(names: Sequence[str]) -> int | None:
    """Number of distinct chambers, or None when some name does not follow the export pattern."""
    try:
        return len(set(group_ids(names)))
    except DataError:
        return None


def choose_group_by(
    names: Sequence[str], split_by: GroupBy, *, generic_folder: bool, source: str = ""
) -> GroupBy:
    """``split_by``, but "file" for a generic image folder whose names carry no chamber.

    Such a folder has nothing to group by, so asking for chambers (the default) would only
    fail; a TwinVAEWarning says that validation is cut by file instead. CHO-K1 layouts keep
    failing: their names are meant to carry the chamber.
    """
    if split_by != "chamber" or not generic_folder:
        return split_by
    unmatched = next((name for name in names if _EXPORT_NAME.match(_stem(name)) is None), None)
    if unmatched is None:
        return split_by
    warnings.warn(
        TwinVAEWarning(
            f"{source or 'image folder'}: file names such as {unmatched!r} carry no chamber "
            "(<experiment>xy<position>t<frame>c<channel>), so validation is cut by file "
            "(data.split_by=file); frames of one time-lapse may then land on both sides"
        ),
        stacklevel=2,
    )
    return "file"


def split_by_chamber(
    image_set: ImageSet,
    val_fraction: float = 0.2,
    seed: int = 0,
    group_by: GroupBy = "chamber",
) -> tuple[ImageSet, ImageSet]:
    """Split into (train, validation) with whole groups on one side.

    Groups are visited in a seeded random order and moved to validation whenever that brings the
    validation share of *labelled* images closer to val_fraction (all images when none is
    labelled). Both sides keep labelled images. Deterministic for a given seed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    groups = np.array(group_ids(image_set.names, group_by))
    unique, inverse = np.unique(groups, return_inverse=True)
    if len(unique) < 2:
        raise DataError(
            f"{image_set.source or 'image set'}: {len(unique)} {group_by} group(s) found; a "
            f"validation split cut by {group_by} needs at least 2"
        )
    labelled = image_set.labelled
    weight_source = labelled if labelled.any() else np.ones(len(image_set), dtype=bool)
    weights = np.bincount(inverse, weights=weight_source, minlength=len(unique))
    if np.count_nonzero(weights) < 2:
        raise DataError(
            f"{image_set.source or 'image set'}: all labelled images come from one {group_by}, "
            "so train and validation cannot both hold labelled images"
        )
    total = float(weights.sum())
    target = val_fraction * total
    chosen: list[int] = []
    val_weight = 0.0
    order = np.random.default_rng(seed).permutation(len(unique))
    for group in order:
        candidate = val_weight + weights[group]
        if candidate >= total:  # train must keep labelled images
            continue
        if abs(candidate - target) < abs(val_weight - target):
            chosen.append(int(group))
            val_weight = candidate
    if not chosen:  # every group alone overshoots the target: take the smallest one
        nonempty = [int(g) for g in order if weights[g] > 0]
        chosen.append(min(nonempty, key=lambda g: weights[g]))
    in_val = np.isin(inverse, chosen)
    return image_set.subset(~in_val), image_set.subset(in_val)
