"""Counts from a bundle's ONNX weights, via the one ONNX bundle runner of the project.

The runner is ``twinvae.knime.scripts.twinvae_bundle.BundlePredictor`` (standalone so that KNIME
can use it without twinvae); this module adapts it to twinvae's errors, image sets and CSV files.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twinvae.data.imageset import ImageSet
from twinvae.errors import DataError, ExportError
from twinvae.evaluation.metrics import round_counts
from twinvae.fileio import atomic_writer

CSV_COLUMNS = ("file", "count", "count_rounded")


@dataclass
class PredictionSummary:
    """What `predict_to_csv` did."""

    out: Path
    images: int
    providers: list[str]
    batch_size: int


def _bundle_module() -> Any:
    from twinvae.knime.scripts import twinvae_bundle

    return twinvae_bundle


def open_predictor(
    bundle: Path | str,
    *,
    batch_size: int = 64,
    providers: Sequence[str] | None = None,
    resize: bool = False,
) -> Any:
    """A BundlePredictor (CUDA provider when onnxruntime offers it, else CPU)."""
    module = _bundle_module()
    try:
        return module.BundlePredictor(
            bundle, providers=providers, batch_size=batch_size, resize=resize
        )
    except (module.BundleError, module.MissingPackageError) as error:
        raise ExportError(str(error)) from None


def predict_bundle_arrays(
    bundle: Path | str,
    images: np.ndarray,
    *,
    batch_size: int = 64,
    providers: Sequence[str] | None = None,
) -> np.ndarray:
    """Counts (N,) float32 for uint8 images (N, 128, 128) from the bundle's ONNX weights."""
    predictor = open_predictor(bundle, batch_size=batch_size, providers=providers)
    try:
        return np.asarray(predictor.predict_arrays(np.asarray(images)), dtype=np.float32)
    except _bundle_module().BundleError as error:
        raise DataError(str(error)) from None


def evaluate_bundle(
    bundle: Path | str,
    image_set: ImageSet,
    *,
    batch_size: int = 64,
    providers: Sequence[str] | None = None,
) -> np.ndarray:
    """Predicted counts (N,) for every image of an image set, in its order."""
    return predict_bundle_arrays(
        bundle, image_set.images, batch_size=batch_size, providers=providers
    )


def collect_image_files(inputs: Sequence[Path | str], recursive: bool = True) -> list[Path]:
    """Image files named directly or found in folders (sorted per folder), without duplicates."""
    module = _bundle_module()
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = module.list_images(path, recursive=recursive)
            if not found:
                raise DataError(
                    f"{path}: no images found; expected {', '.join(module.IMAGE_SUFFIXES)} files"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return list(dict.fromkeys(files))


def predict_to_csv(
    bundle: Path | str,
    inputs: Sequence[Path | str],
    out: Path | str,
    *,
    overwrite: bool = False,
    batch_size: int = 64,
    providers: Sequence[str] | None = None,
    resize: bool = False,
    recursive: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> PredictionSummary:
    """Count cells in image files/folders and write `file,count,count_rounded` rows to `out`.

    The CSV is written to a temporary file and renamed, so a failure leaves no partial file.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: file exists; choose another name or pass --overwrite")
    files = collect_image_files(inputs, recursive=recursive)
    predictor = open_predictor(bundle, batch_size=batch_size, providers=providers, resize=resize)
    try:
        results = predictor.predict_files(files, progress=progress)
    except _bundle_module().BundleError as error:
        raise DataError(str(error)) from None
    counts = np.array([count for _, count in results], dtype=np.float64)
    rounded = round_counts(counts)
    try:
        with atomic_writer(out, replace=overwrite) as stream:
            writer = csv.writer(stream)
            writer.writerow(CSV_COLUMNS)
            for (file, count), whole in zip(results, rounded, strict=True):
                writer.writerow([file, f"{count:.6f}", int(whole)])
    except FileExistsError:
        raise DataError(f"{out}: file exists; choose another name or pass --overwrite") from None
    return PredictionSummary(
        out=out,
        images=len(results),
        providers=list(predictor.providers),
        batch_size=predictor.batch_size,
    )
