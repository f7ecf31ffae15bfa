"""The classical baseline: a watershed cell counter (scikit-image) tuned on the validation split.

Cells in both modalities are outlined by a rim that differs from the background: dark in
bright-field (bright fill, dark rim on a light background), bright in phase contrast (the halo
around a dark cell on a dark background). The counter therefore works on the deviation from a
smooth background estimate:

    deviation = image - gaussian(image, background_sigma)   (dark / bright / absolute part)
    -> gaussian smoothing -> threshold (Otsu or local, scaled, at least min_contrast)
    -> closing (joins broken rims) -> fill holes up to max_hole pixels (a closed rim becomes a
    disc; the much larger chamber interior stays open) -> opening (removes the thin chamber
    walls) -> distance transform -> peak_local_max markers -> watershed
    -> keep regions of at least min_size pixels whose centre is not in the margin

Its parameters are chosen by a grid search minimising MAE on the labelled images of the
chamber-based validation split of the training data; the test split is never looked at.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy import ndimage

from twinvae.data.imageset import ImageSet
from twinvae.errors import ConfigError, DataError
from twinvae.evaluation.evaluate import prediction_report
from twinvae.evaluation.metrics import count_metrics

PARAMS_FORMAT = "twinvae-watershed/1"
Modality = Literal["bf", "pc"]
Polarity = Literal["dark", "bright", "absolute"]


class WatershedParams(BaseModel):
    """Everything that decides a watershed count (lengths in pixels, intensities in 0..1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    polarity: Polarity = Field(
        "absolute", description="which deviation from the background marks cells"
    )
    background_sigma: float = Field(12.0, ge=0.0, description="0 = the image median is background")
    smooth_sigma: float = Field(1.0, ge=0.0)
    threshold: Literal["otsu", "local"] = "otsu"
    threshold_scale: float = Field(1.0, gt=0.0, description="the threshold is multiplied by this")
    local_block_size: int = Field(31, ge=3, description="odd window of the local threshold")
    min_contrast: float = Field(0.03, ge=0.0, description="lowest threshold (0..1 grey levels)")
    line_length: int = Field(
        31,
        ge=0,
        description="straight horizontal/vertical runs this long (chamber walls) are "
        "removed from the mask; 0 = keep them",
    )
    close_radius: int = Field(1, ge=0, description="closing of the mask (joins broken rims)")
    max_hole: int = Field(
        900,
        ge=0,
        description="holes up to this area (pixels) are filled: a cell's rim becomes "
        "a disc, while the large chamber interior stays open",
    )
    open_radius: int = Field(1, ge=0, description="opening of the mask (removes thin walls)")
    min_distance: int = Field(4, ge=1, description="smallest distance between two cell centres")
    min_size: int = Field(12, ge=1, description="smallest region (pixels) counted as a cell")
    margin: int = Field(0, ge=0, description="regions centred this close to the border are ignored")

    def signal_key(self) -> tuple[Any, ...]:
        return (self.polarity, self.background_sigma, self.smooth_sigma)


def default_grid(modality: Modality) -> dict[str, list[Any]]:
    """The grid searched when a plan row gives none (48 combinations)."""
    return {
        "polarity": ["dark" if modality == "bf" else "bright", "absolute"],
        "threshold_scale": [0.5, 0.8],
        "min_size": [10, 20, 40],
        "min_distance": [3, 5],
        "margin": [0, 10],
    }


def expand_grid(grid: dict[str, list[Any]]) -> list[WatershedParams]:
    """Every combination of the grid's values (other parameters at their defaults)."""
    if not grid:
        return [WatershedParams()]
    unknown = sorted(set(grid) - set(WatershedParams.model_fields))
    if unknown:
        raise ConfigError(
            f"watershed grid: unknown parameter(s) {', '.join(unknown)}; known: "
            f"{', '.join(WatershedParams.model_fields)}"
        )
    empty = [key for key, values in grid.items() if not isinstance(values, list) or not values]
    if empty:
        raise ConfigError(f"watershed grid: {', '.join(empty)} must be non-empty lists of values")
    keys = list(grid)
    combos: list[WatershedParams] = []
    for values in itertools.product(*(grid[k] for k in keys)):
        try:
            combos.append(WatershedParams(**dict(zip(keys, values, strict=True))))
        except ValidationError as error:
            problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors())
            raise ConfigError(f"watershed grid: invalid value ({problems})") from None
    return combos


# --- counting --------------------------------------------------------------------------------


def cell_signal(image: np.ndarray, params: WatershedParams) -> np.ndarray:
    """How strongly each pixel deviates from the background in the cells' direction (>= 0)."""
    from skimage.filters import gaussian

    grey = image.astype(np.float32) / 255.0
    if params.background_sigma > 0:
        background = gaussian(grey, sigma=params.background_sigma, preserve_range=True)
    else:
        background = np.full_like(grey, float(np.median(grey)))
    deviation = grey - background
    if params.polarity == "dark":
        signal = np.clip(-deviation, 0.0, None)
    elif params.polarity == "bright":
        signal = np.clip(deviation, 0.0, None)
    else:
        signal = np.abs(deviation)
    if params.smooth_sigma > 0:
        signal = gaussian(signal, sigma=params.smooth_sigma, preserve_range=True)
    return np.asarray(signal, dtype=np.float32)


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return np.asarray(x * x + y * y <= radius * radius)


def _straight_lines(mask: np.ndarray, length: int) -> np.ndarray:
    """Pixels on horizontal or vertical runs of at least `length` pixels, slightly widened."""
    horizontal = ndimage.binary_opening(mask, structure=np.ones((1, length), dtype=bool))
    vertical = ndimage.binary_opening(mask, structure=np.ones((length, 1), dtype=bool))
    return np.asarray(ndimage.binary_dilation(horizontal | vertical, structure=_disk(2)))


def _fill_small_holes(mask: np.ndarray, max_hole: int) -> np.ndarray:
    """Fill background regions of at most max_hole pixels that do not touch the border."""
    holes, count = ndimage.label(~mask)
    if count == 0:
        return mask
    sizes = np.bincount(holes.ravel(), minlength=count + 1)
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill = sizes <= max_hole
    fill[0] = False
    fill[border] = False
    return np.asarray(mask | fill[holes])


def label_cells(signal: np.ndarray, params: WatershedParams) -> np.ndarray:
    """Watershed labels (0 = background, 1..n = cells) of one image's cell signal."""
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_local, threshold_otsu
    from skimage.segmentation import watershed

    if float(signal.max()) <= params.min_contrast:
        return np.zeros(signal.shape, dtype=np.int32)
    if params.threshold == "otsu":
        level: np.ndarray | float = float(threshold_otsu(signal)) * params.threshold_scale
    else:
        block = params.local_block_size | 1
        level = threshold_local(signal, block_size=block) * params.threshold_scale
    mask = signal > np.maximum(level, params.min_contrast)
    if params.line_length:
        mask = mask & ~_straight_lines(mask, params.line_length)
    if params.close_radius:
        mask = ndimage.binary_closing(mask, structure=_disk(params.close_radius))
    if params.max_hole:
        mask = _fill_small_holes(mask, params.max_hole)
    if params.open_radius:
        mask = ndimage.binary_opening(mask, structure=_disk(params.open_radius))
    components, _ = ndimage.label(mask)
    sizes = np.bincount(components.ravel())
    small = sizes < params.min_size
    small[0] = True
    mask = ~small[components]
    if not mask.any():
        return np.zeros(signal.shape, dtype=np.int32)
    distance = ndimage.distance_transform_edt(mask)
    components, _ = ndimage.label(mask)
    peaks = peak_local_max(
        distance, min_distance=params.min_distance, labels=components, exclude_border=False
    )
    markers = np.zeros(signal.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return np.asarray(watershed(-distance, markers, mask=mask), dtype=np.int32)


def count_regions(labels: np.ndarray, params: WatershedParams) -> int:
    """Regions of at least min_size pixels whose centre lies outside the margin."""
    count = int(labels.max())
    if count == 0:
        return 0
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index)
    centres = np.array(ndimage.center_of_mass(np.ones_like(labels), labels, index)).reshape(-1, 2)
    height, width = labels.shape
    m = params.margin
    inside = (
        (centres[:, 0] >= m)
        & (centres[:, 0] < height - m)
        & (centres[:, 1] >= m)
        & (centres[:, 1] < width - m)
    )
    return int(np.count_nonzero((sizes >= params.min_size) & inside))


def count_cells(image: np.ndarray, params: WatershedParams) -> int:
    """The watershed count of one uint8 (H, W) image."""
    return count_regions(label_cells(cell_signal(image, params), params), params)


def count_images(images: np.ndarray, params: WatershedParams) -> np.ndarray:
    """Counts (N,) as float64 for uint8 images (N, H, W)."""
    return np.array([count_cells(image, params) for image in images], dtype=np.float64)


# --- tuning ----------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """The chosen parameters, their validation metrics and every combination's score."""

    params: WatershedParams
    mae: float
    accuracy: float
    seconds: float
    images: int
    search: list[dict[str, Any]] = field(default_factory=list)


def tune_watershed(
    images: np.ndarray,
    counts: np.ndarray,
    candidates: Iterable[WatershedParams],
    progress: Callable[[int, int], None] | None = None,
) -> TuneResult:
    """The candidate with the lowest MAE on the labelled images (ties: higher accuracy, earlier).

    The smoothed cell signal is computed once per (polarity, background, smoothing) setting.
    """
    counts = np.asarray(counts)
    if len(images) == 0 or np.any(counts < 1):
        raise DataError("watershed tuning needs labelled images (every count >= 1)")
    options = list(candidates)
    if not options:
        raise ConfigError("watershed tuning: the parameter grid is empty")
    started = time.perf_counter()
    signals: dict[tuple[Any, ...], list[np.ndarray]] = {}
    search: list[dict[str, Any]] = []
    best: tuple[float, float, int] | None = None
    for index, params in enumerate(options):
        key = params.signal_key()
        if key not in signals:
            signals[key] = [cell_signal(image, params) for image in images]
        predicted = np.array(
            [count_regions(label_cells(s, params), params) for s in signals[key]], dtype=float
        )
        metrics = count_metrics(predicted, counts)
        search.append({"params": params.model_dump(), **metrics})
        score = (metrics["mae"], -metrics["accuracy"], index)
        if best is None or score < best:
            best = score
        if progress is not None:
            progress(index + 1, len(options))
    assert best is not None
    chosen = search[best[2]]
    return TuneResult(
        params=options[best[2]],
        mae=float(chosen["mae"]),
        accuracy=float(chosen["accuracy"]),
        seconds=time.perf_counter() - started,
        images=len(images),
        search=search,
    )


def validation_set(
    data_root: Path | str, modality: Modality, val_fraction: float = 0.2, split_seed: int = 0
) -> ImageSet:
    """Labelled images of the chamber-based validation split of the CHO-K1 training data.

    The same cut as the Twin-VAE runs with data.val_fraction / data.split_seed.
    """
    from twinvae.data.readers import load_image_set
    from twinvae.data.splits import split_by_chamber

    train = load_image_set(Path(data_root), split="train", modality=modality)
    _, val = split_by_chamber(train, val_fraction=val_fraction, seed=split_seed)
    labelled = val.labelled_only()
    labelled.source = f"chamber validation split of {train.source}"
    return labelled


# --- parameter files and evaluation ----------------------------------------------------------


def save_params(
    path: Path,
    result: TuneResult,
    *,
    modality: Modality,
    grid: dict[str, list[Any]],
    tuned_on: dict[str, Any],
    overwrite: bool = False,
) -> None:
    """Write the tuned parameters (with the grid and every score) as JSON."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{path}: exists; pass --overwrite to replace it")
    payload = {
        "format": PARAMS_FORMAT,
        "modality": modality,
        "params": result.params.model_dump(),
        "validation": {"mae": result.mae, "accuracy": result.accuracy, "images": result.images},
        "tuned_on": tuned_on,
        "tuning_seconds": result.seconds,
        "grid": grid,
        "search": result.search,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")


def load_params(path: Path | str) -> WatershedParams:
    """The parameters stored by `save_params` (or a bare JSON object of parameters)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: watershed parameter file not found") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a readable JSON file ({error})") from None
    if isinstance(data, dict) and data.get("format") == PARAMS_FORMAT:
        data = data.get("params")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of watershed parameters")
    try:
        return WatershedParams.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"{path}: invalid watershed parameters: {problems}") from None


def load_grid(path: Path | str) -> dict[str, list[Any]]:
    """A JSON object parameter -> list of values."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: grid file not found") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object parameter -> list of values")
    expand_grid(data)  # validates
    return data


def watershed_report(params_path: Path | str, image_set: ImageSet) -> dict[str, Any]:
    """The same report as `twinvae.evaluation.evaluate.evaluate`, for the watershed counter."""
    labelled = image_set.labelled_only()
    if len(labelled) == 0:
        raise DataError(f"{image_set.source or 'data'}: no labelled image to evaluate on")
    predictions = count_images(labelled.images, load_params(params_path))
    return prediction_report(predictions, labelled, model=str(params_path))
