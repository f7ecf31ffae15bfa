"""bioimage.io model bundles: export, validation and prediction.

Heavy dependencies (bioimageio, onnx, onnxruntime) are imported where they are used.
"""

from __future__ import annotations

from twinvae.export.bundle import (
    ExportOptions,
    ExportResult,
    ExportSource,
    export_bundle,
    export_source,
    source_from_checkpoint,
)
from twinvae.export.checks import CheckResult, ValidationReport, validate_bundle
from twinvae.export.rdf import BundleMetadata

__all__ = [
    "BundleMetadata",
    "CheckResult",
    "ExportOptions",
    "ExportResult",
    "ExportSource",
    "ValidationReport",
    "export_bundle",
    "export_source",
    "source_from_checkpoint",
    "validate_bundle",
]
