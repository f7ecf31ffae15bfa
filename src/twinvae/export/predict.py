"""Counts from a bundle's ONNX weights, via the one ONNX bundle runner of the project.

The runner is ``twinvae.runtime.twinvae_bundle.BundlePredictor`` (standalone, so that the KNIME
workflows ship the same file); it opens bundles with the runtime's checked opener. This module
adapts it to twinvae's errors, image sets and CSV files.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twinvae.data.imageset import ImageSet
from twinvae.data.splits import time_point
from twinvae.errors import DataError, ExportError, SkippedInputWarning
from twinvae.evaluation.metrics import round_counts
from twinvae.fileio import atomic_writer
from twinvae.runtime import twinvae_bundle as runtime

CSV_COLUMNS = ("file", "count", "count_rounded", "chamber", "frame")
"""chamber and frame: told from microscope export names (<experiment>xy<position>t<frame>c1),
empty for other names."""


@dataclass
class PredictionSummary:
    """What `predict_to_csv` did."""

    out: Path
    images: int
    providers: list[str]
    batch_size: int
    skipped: list[str] = field(default_factory=list)
    """With skip_bad: "file: why" for each image that could not be read (not in the CSV)."""


def open_predictor(
    bundle: Path | str,
    *,
    batch_size: int = 64,
    providers: Sequence[str] | None = None,
    resize: bool = False,
) -> runtime.BundlePredictor:
    """A BundlePredictor (CUDA provider when onnxruntime offers it, else CPU)."""
    try:
        return runtime.BundlePredictor(
            bundle, providers=providers, batch_size=batch_size, resize=resize
        )
    except (runtime.BundleError, runtime.MissingPackageError) as error:
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
    except runtime.BundleError as error:
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
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = runtime.list_images(path, recursive=recursive)
            if not found:
                raise DataError(
                    f"{path}: no images found; expected {', '.join(runtime.IMAGE_SUFFIXES)} files"
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
    skip_bad: bool = False,
) -> PredictionSummary:
    """Count cells in image files/folders and write `file,count,count_rounded,chamber,frame`
    rows to `out` (chamber and frame of microscope export names, else empty).

    The CSV is written to a temporary file and renamed, so a failure leaves no partial file.
    An unreadable image stops everything, or with ``skip_bad`` is left out of the CSV and
    listed in one SkippedInputWarning (and in the summary).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: file exists; choose another name or pass --overwrite")
    files = collect_image_files(inputs, recursive=recursive)
    predictor = open_predictor(bundle, batch_size=batch_size, providers=providers, resize=resize)
    skipped: list[str] = []
    if skip_bad:
        files, skipped = _readable_files(predictor, files)
    try:
        results = predictor.predict_files(files, progress=progress)
    except runtime.BundleError as error:
        raise DataError(str(error)) from None
    counts = np.array([count for _, count in results], dtype=np.float64)
    rounded = round_counts(counts)
    try:
        with atomic_writer(out, replace=overwrite) as stream:
            writer = csv.writer(stream)
            writer.writerow(CSV_COLUMNS)
            for (file, count), whole in zip(results, rounded, strict=True):
                point = time_point(Path(file).name)
                chamber, frame = point if point is not None else ("", "")
                writer.writerow([file, f"{count:.6f}", int(whole), chamber, frame])
    except FileExistsError:
        raise DataError(f"{out}: file exists; choose another name or pass --overwrite") from None
    return PredictionSummary(
        out=out,
        images=len(results),
        providers=list(predictor.providers),
        batch_size=predictor.batch_size,
        skipped=skipped,
    )


def _readable_files(
    predictor: runtime.BundlePredictor, files: list[Path]
) -> tuple[list[Path], list[str]]:
    """The files the predictor reads (each is read once more to predict), and why the others
    cannot be read; the skipped ones are listed in one SkippedInputWarning."""
    usable: list[Path] = []
    skipped: list[str] = []
    for file in files:
        try:
            predictor.read_images([file])
        except runtime.BundleError as error:
            skipped.append(str(error))
        else:
            usable.append(file)
    if skipped:
        listing = "\n  ".join(skipped)
        warnings.warn(
            SkippedInputWarning(
                f"skipped {len(skipped)} bad input(s) of {len(files)} images:\n  {listing}"
            ),
            stacklevel=3,
        )
    if not usable:
        raise DataError(f"no usable images (all {len(files)} inputs were skipped)")
    return usable, skipped
