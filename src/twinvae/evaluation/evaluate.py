"""Evaluate a checkpoint or an exported bundle on a labelled image set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from twinvae.data.imageset import ImageSet
from twinvae.data.splits import image_time_points
from twinvae.errors import DataError
from twinvae.evaluation.metrics import evaluation_report, growth_report, round_counts


def is_bundle(path: Path) -> bool:
    """A bioimage.io bundle: a .zip, or a folder holding rdf.yaml."""
    return path.suffix.lower() == ".zip" or (path.is_dir() and (path / "rdf.yaml").is_file())


def predict_with_model(
    model_path: Path, images: np.ndarray, *, tta: bool = False, domain: str = "natural"
) -> np.ndarray:
    """Counts for uint8 (N, H, W) images from a checkpoint (PyTorch) or a bundle (ONNX Runtime)."""
    if is_bundle(model_path):
        if tta:
            raise DataError("test-time augmentation is only available for checkpoints")
        from twinvae.export.predict import predict_bundle_arrays

        return predict_bundle_arrays(model_path, images)
    from twinvae.config import TrainConfig
    from twinvae.evaluation.predict import predict_counts
    from twinvae.training.checkpoint import load_model
    from twinvae.training.device import setup_runtime

    model, _ = load_model(model_path)
    runtime = setup_runtime(TrainConfig(precision="fp32"))
    model.to(runtime.device)
    return predict_counts(model, images, runtime, domain=domain, tta=tta)


def evaluate(
    model_path: Path, image_set: ImageSet, *, tta: bool = False, domain: str = "natural"
) -> dict[str, Any]:
    """Metrics (overall and per count) plus per-image predictions on the labelled images."""
    labelled = image_set.labelled_only()
    if len(labelled) == 0:
        raise DataError(f"{image_set.source or 'data'}: no labelled image to evaluate on")
    predictions = predict_with_model(model_path, labelled.images, tta=tta, domain=domain)
    return prediction_report(predictions, labelled, model=str(model_path))


def prediction_report(predictions: np.ndarray, labelled: ImageSet, model: str) -> dict[str, Any]:
    """Metrics (overall, per count, growth per chamber) and one row per image (with its chamber
    and frame where known), for predictions on labelled images."""
    report = evaluation_report(predictions, labelled.counts)
    report["model"] = model
    report["data"] = labelled.source
    points = image_time_points(labelled)
    chambers = [p[0] if p is not None else None for p in points]
    frames = [p[1] if p is not None else None for p in points]
    report["growth"] = (
        growth_report(predictions, labelled.counts, chambers, frames)
        if any(p is not None for p in points)
        else None
    )
    report["predictions"] = [
        {
            "file": name,
            "chamber": chamber,
            "frame": frame,
            "count": int(true),
            "predicted": float(pred),
            "rounded": int(rounded),
        }
        for name, chamber, frame, true, pred, rounded in zip(
            labelled.names,
            chambers,
            frames,
            labelled.counts,
            predictions,
            round_counts(predictions),
            strict=True,
        )
    ]
    return report
