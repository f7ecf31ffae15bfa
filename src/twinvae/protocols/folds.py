"""Chamber cross-validation folds: whole chambers of the pooled CHO-K1 frames assigned to folds.

The pooled data of a modality is every frame listed in train.csv and test.csv (labelled or not).
A fold file names, for each fold, the chambers held out in it; every chamber is in exactly one
fold. `assign_folds` makes the committed files: chambers sorted by their mean labelled count are
cut into strata of ``n_folds`` neighbours, and each stratum is dealt to the folds in a seeded
random order, so every fold holds chambers with low and with high counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from twinvae.config import CONFIG_DIR
from twinvae.data.imageset import Modality
from twinvae.data.readers import SPLITS, Split, list_count_csv, modality_folder
from twinvae.data.splits import parse_chamber, parse_frame
from twinvae.errors import ConfigError, DataError

FOLDS_FORMAT = "twinvae-folds/1"
FOLD_DIR = CONFIG_DIR / "folds"
STRATEGY = (
    "chambers sorted by mean labelled count (ties by name), cut into strata of n_folds "
    "neighbours; each stratum dealt to the folds in a seeded random order (numpy "
    "default_rng(seed).permutation); a last, smaller stratum goes to the folds with the fewest "
    "labelled images"
)


@dataclass(frozen=True)
class Frame:
    """One image listed in the CHO-K1 data: its file, label, split and place in time."""

    split: Split
    name: str
    path: Path
    count: int
    chamber: str
    frame: int

    @property
    def labelled(self) -> bool:
        return self.count > 0


def list_frames(data_root: Path | str, modality: Modality) -> list[Frame]:
    """Every frame of <data_root>/<modality>/train.csv and test.csv, without reading images."""
    frames: list[Frame] = []
    for split in SPLITS:
        folder = modality_folder(Path(data_root), modality, split)
        csv_path = folder / f"{split}.csv"
        for name, count in list_count_csv(csv_path):
            try:
                chamber, frame = parse_chamber(name), parse_frame(name)
            except DataError as error:
                raise DataError(f"{csv_path}: {error}") from None
            frames.append(Frame(split, name, folder / name, count, chamber, frame))
    return frames


class ChamberStats(BaseModel):
    """What a chamber holds (recorded in the fold file, for the reader)."""

    model_config = ConfigDict(extra="forbid")

    images: int = Field(ge=1)
    labelled: int = Field(ge=0)
    min_count: int | None = None
    max_count: int | None = None
    mean_count: float | None = None


def chamber_stats(frames: list[Frame]) -> dict[str, ChamberStats]:
    """Images, labelled images and the labelled count range of every chamber."""
    stats: dict[str, ChamberStats] = {}
    for chamber in sorted({f.chamber for f in frames}):
        counts = [f.count for f in frames if f.chamber == chamber and f.labelled]
        stats[chamber] = ChamberStats(
            images=sum(1 for f in frames if f.chamber == chamber),
            labelled=len(counts),
            min_count=min(counts) if counts else None,
            max_count=max(counts) if counts else None,
            mean_count=round(float(np.mean(counts)), 3) if counts else None,
        )
    return stats


class FoldFile(BaseModel):
    """A committed assignment of whole chambers to cross-validation folds."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["twinvae-folds/1"] = "twinvae-folds/1"
    modality: Modality
    seed: int
    strategy: str = STRATEGY
    folds: list[list[str]] = Field(min_length=2)
    chambers: dict[str, ChamberStats]

    @model_validator(mode="after")
    def _each_chamber_once(self) -> FoldFile:
        seen: dict[str, int] = {}
        for index, fold in enumerate(self.folds):
            if not fold:
                raise ValueError(f"fold {index} holds no chamber")
            for chamber in fold:
                if chamber in seen:
                    raise ValueError(f"chamber {chamber} is in fold {seen[chamber]} and {index}")
                seen[chamber] = index
        missing = sorted(set(self.chambers) - set(seen))
        unknown = sorted(set(seen) - set(self.chambers))
        if missing or unknown:
            raise ValueError(
                f"folds and chambers differ: in no fold {missing}, without stats {unknown}"
            )
        return self

    def fold_of(self, chamber: str) -> int:
        for index, fold in enumerate(self.folds):
            if chamber in fold:
                return index
        raise ConfigError(f"chamber {chamber} is in no fold of the {self.modality} fold file")

    def check_index(self, fold: int) -> None:
        if not 0 <= fold < len(self.folds):
            raise ConfigError(
                f"fold {fold}: the {self.modality} fold file has folds 0 to {len(self.folds) - 1}"
            )


def assign_folds(stats: dict[str, ChamberStats], n_folds: int, seed: int) -> list[list[str]]:
    """Whole chambers to ``n_folds`` folds, stratified by mean labelled count (see STRATEGY)."""
    if n_folds < 2:
        raise ConfigError(f"n_folds must be at least 2, got {n_folds}")
    if len(stats) < n_folds:
        raise ConfigError(f"{len(stats)} chamber(s) cannot fill {n_folds} folds")
    order = sorted(stats, key=lambda c: (stats[c].mean_count or 0.0, c))
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    for start in range(0, len(order), n_folds):
        stratum = order[start : start + n_folds]
        if len(stratum) == n_folds:
            targets = [int(k) for k in rng.permutation(n_folds)]
        else:
            tie_break = rng.permutation(n_folds)
            labelled = [sum(stats[c].labelled for c in fold) for fold in folds]
            ranked = sorted(
                range(n_folds), key=lambda k: (len(folds[k]), labelled[k], tie_break[k])
            )
            targets = ranked[: len(stratum)]
        for chamber, target in zip(stratum, targets, strict=True):
            folds[target].append(chamber)
    return [sorted(fold) for fold in folds]


def make_fold_file(
    frames: list[Frame], modality: Modality, n_folds: int = 4, seed: int = 0
) -> FoldFile:
    """The fold file `assign_folds` makes for these frames."""
    stats = chamber_stats(frames)
    return FoldFile(
        modality=modality, seed=seed, folds=assign_folds(stats, n_folds, seed), chambers=stats
    )


def fold_file_path(modality: Modality) -> Path:
    """The committed fold file of a CHO-K1 modality."""
    return FOLD_DIR / f"cho-k1-{modality}.yaml"


def load_folds(source: Path | str) -> FoldFile:
    """A fold file by path, or the committed one of a modality ("pc", "bf")."""
    path = fold_file_path(source) if source in ("pc", "bf") else Path(source)  # type: ignore[arg-type]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: fold file not found") from None
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not a readable YAML fold file ({error})") from None
    try:
        return FoldFile.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"{path}: invalid fold file: {problems}") from None


def fold_file_text(fold_file: FoldFile) -> str:
    """The YAML of a fold file, with a header saying how it was made."""
    header = (
        f"# Chamber cross-validation folds of CHO-K1 {fold_file.modality.upper()}: the chambers "
        "held out in each fold\n# (of the pooled train.csv + test.csv frames). Made by\n"
        f"#   twinvae protocol folds --modality {fold_file.modality} --folds "
        f"{len(fold_file.folds)} --seed {fold_file.seed} --write FILE\n"
        "# Do not edit by hand: results record this file's sha256.\n"
    )
    body = yaml.safe_dump(fold_file.model_dump(mode="json"), sort_keys=False, width=100)
    return header + body


def check_frames(fold_file: FoldFile, frames: list[Frame], origin: str) -> None:
    """Every chamber of the data is in the fold file and every chamber of the file in the data."""
    found = {f.chamber for f in frames}
    unknown = sorted(found - set(fold_file.chambers))
    absent = sorted(set(fold_file.chambers) - found)
    if unknown or absent:
        raise ConfigError(
            f"{origin}: the {fold_file.modality} fold file does not fit the data: chambers in no "
            f"fold {unknown}, fold chambers not in the data {absent}; use the data the folds "
            "were made for, or make folds for this data with `twinvae protocol folds --write`"
        )


def split_fold(
    fold_file: FoldFile, frames: list[Frame], fold: int
) -> tuple[list[Frame], list[Frame]]:
    """(training frames, held-out frames) of a fold: whole chambers on each side."""
    fold_file.check_index(fold)
    held_out = set(fold_file.folds[fold])
    train = [f for f in frames if f.chamber not in held_out]
    test = [f for f in frames if f.chamber in held_out]
    assert not {f.chamber for f in train} & {f.chamber for f in test}
    return train, test
