"""The bioimage.io model description (rdf.yaml, format 0.5) of a twinvae bundle."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from twinvae.citations import PAPERS
from twinvae.config import ExperimentConfig
from twinvae.data.imageset import IMAGE_SIZE
from twinvae.data.modality import MODALITY_NAMES as GENERATOR_MODALITY_NAMES
from twinvae.data.modality import modality_name
from twinvae.export.images import INPUT_GAIN
from twinvae.export.network import COUNT_ID, INPUT_ID, MU_ID, NetworkSpec
from twinvae.runtime.twinvae_bundle import FULL_WEIGHTS_FILE

FORMAT_VERSION = "0.5.12"
RDF_NAME = "rdf.yaml"
DOCUMENTATION_FILE = "README.md"
COVER_FILE = "cover.png"
CONFIG_FILE = "config.yaml"
TEST_INPUT_FILE = "test_input.npy"
SAMPLE_INPUT_FILE = "sample_input.tif"

ABSOLUTE_TOLERANCE = 1e-3
"""Counts reproduced elsewhere (other OS, GPU) may differ by this much plus the relative part."""
RELATIVE_TOLERANCE = 1e-3

MODALITY_NAMES = GENERATOR_MODALITY_NAMES

CITATIONS: tuple[dict[str, str], ...] = tuple({"text": p.text, "doi": p.doi} for p in PAPERS)
"""The `cite` entries of rdf.yaml (from twinvae.citations, shared with the KNIME workflows)."""


def test_output_file(output_id: str) -> str:
    return f"test_output_{output_id}.npy"


def sample_output_file(output_id: str) -> str:
    return f"sample_output_{output_id}.tif"


@dataclass
class BundleMetadata:
    """Who and what the bundle is, beyond the network itself."""

    name: str | None = None
    description: str | None = None
    authors: tuple[str, ...] = ("twinvae contributors",)
    version: str = "0.1.0"
    license: str = "MIT"
    timestamp: datetime | None = None
    tags: tuple[str, ...] = ()
    extra_metrics: dict[str, float] = field(default_factory=dict)
    metrics_title: str = "Further metrics given at export"


def default_name(modality: str) -> str:
    return f"Twin-VAE CHO-K1 {modality_name(modality)} cell counter"


def default_description(modality: str) -> str:
    return (
        f"Counts CHO-K1 suspension cells in 128x128 {modality_name(modality)} "
        "images of microfluidic cultivation chambers: the natural-image encoder and count "
        "regressor of a Twin-VAE trained on natural and synthetic images "
        "(Stallmann et al. 2021; Kenneweg, Stallmann, Hammer 2023)."
    )


def reproducibility_tolerances(test_outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One entry per output, valid for a scalar count.

    bioimage.io requires absolute_tolerance <= 1% of the largest test output value, so it
    shrinks for small counts and is 0 when the largest value is <= 0 (then only the relative
    tolerance applies). The count output has one element per image, so no mismatching
    element may be tolerated (mismatched_elements_per_million = 0).
    """
    entries: list[dict[str, Any]] = []
    for output_id, values in test_outputs.items():
        largest = float(np.max(values))
        # 0.9% rather than 1%: bioimage.io compares in float32, keep clear of rounding.
        absolute = min(ABSOLUTE_TOLERANCE, 0.009 * largest) if largest > 0 else 0.0
        entries.append(
            {
                "output_ids": [output_id],
                "absolute_tolerance": absolute,
                "relative_tolerance": RELATIVE_TOLERANCE,
                "mismatched_elements_per_million": 0,
            }
        )
    return entries


def _file(source: str, hashes: dict[str, str]) -> dict[str, str]:
    return {"source": source, "sha256": hashes[source]}


def _input_descr(hashes: dict[str, str]) -> dict[str, Any]:
    return {
        "id": INPUT_ID,
        "description": f"8-bit grey image, {IMAGE_SIZE}x{IMAGE_SIZE} px, values 0..255 as float32",
        "axes": [
            {"type": "batch"},
            {"type": "channel", "channel_names": ["grey"]},
            {"type": "space", "id": "y", "size": IMAGE_SIZE},
            {"type": "space", "id": "x", "size": IMAGE_SIZE},
        ],
        "data": {"type": "float32", "range": [0.0, 255.0]},
        "test_tensor": _file(TEST_INPUT_FILE, hashes),
        "sample_tensor": _file(SAMPLE_INPUT_FILE, hashes),
        "preprocessing": [
            {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
            {"id": "scale_linear", "kwargs": {"gain": INPUT_GAIN, "offset": 0.0}},
        ],
    }


def _output_descrs(spec: NetworkSpec, hashes: dict[str, str]) -> list[dict[str, Any]]:
    outputs: list[dict[str, Any]] = [
        {
            "id": COUNT_ID,
            "description": "cells in the image (raw regression output: round it, clip at 0)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["count"]}],
            "data": {"type": "float32"},
            "test_tensor": _file(test_output_file(COUNT_ID), hashes),
            "sample_tensor": _file(sample_output_file(COUNT_ID), hashes),
        }
    ]
    if spec.with_mu:
        names = [f"mu{i}" for i in range(spec.model.latent_dim)]
        outputs.append(
            {
                "id": MU_ID,
                "description": "latent mean mu of the shared encoder (for plots and clustering)",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": names}],
                "data": {"type": "float32"},
                "test_tensor": _file(test_output_file(MU_ID), hashes),
                "sample_tensor": _file(sample_output_file(MU_ID), hashes),
            }
        )
    return outputs


def _training_details(config: ExperimentConfig, epoch: int) -> dict[str, Any]:
    loss = config.loss
    return {
        "training_preprocessing": (
            "8-bit grey images divided by 255; augmentation "
            + (
                f"(flips {config.augment.flips}, rot90 {config.augment.rot90}, rotation <= "
                f"{config.augment.max_rotation_deg} deg, crop scale >= "
                f"{config.augment.crop_scale}, noise std <= {config.augment.noise_std})"
                if config.augment.enabled
                else "off"
            )
        ),
        "training_epochs": float(epoch),
        "training_batch_size": float(config.train.batch_size),
        "initial_learning_rate": config.optim.lr,
        "learning_rate_schedule": config.optim.schedule,
        "loss_function": (
            f"Twin loss per domain: {loss.rec_weight} * reconstruction ({loss.reconstruction}) + "
            f"{loss.reg_weight} * count regression + {loss.kl_weight} * KL"
        ),
        "optimizer": config.optim.optimizer,
        "optimizer_kwargs": {"lr": config.optim.lr, "weight_decay": config.optim.weight_decay},
        "regularization": (
            f"dropout {config.model.dropout}, weight decay {config.optim.weight_decay}"
        ),
    }


def build_rdf(
    *,
    spec: NetworkSpec,
    config: ExperimentConfig,
    metadata: BundleMetadata,
    hashes: dict[str, str],
    weights: dict[str, dict[str, Any]],
    test_outputs: dict[str, np.ndarray],
    parameter_count: int,
    epoch: int,
    timestamp: datetime,
    twinvae_info: dict[str, Any],
) -> dict[str, Any]:
    """The complete rdf.yaml content; every file it names must be in `hashes`."""
    modality = config.data.modality
    name_of_modality = modality_name(modality)
    tags = [
        "cell-counting",
        "regression",
        "twin-vae",
        "variational-autoencoder",
        "transfer-learning",
        "cho-k1",
        "microfluidics",
        "single-cell-cultivation",
        MODALITY_NAMES.get(modality, modality),
        "2d",
        "pytorch",
        "onnx",
        "torchscript",
        *metadata.tags,
    ]
    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": metadata.name or default_name(modality),
        "description": metadata.description or default_description(modality),
        "authors": [{"name": name} for name in metadata.authors],
        "cite": [dict(c) for c in CITATIONS],
        "license": metadata.license,
        "tags": list(dict.fromkeys(tags)),
        "version": metadata.version,
        "timestamp": timestamp.isoformat(),
        "documentation": _file(DOCUMENTATION_FILE, hashes),
        "covers": [_file(COVER_FILE, hashes)],
        "attachments": [
            _file(name, hashes) for name in (CONFIG_FILE, FULL_WEIGHTS_FILE) if name in hashes
        ],
        "inputs": [_input_descr(hashes)],
        "outputs": _output_descrs(spec, hashes),
        "weights": weights,
        "config": {
            "bioimageio": {
                "reproducibility_tolerance": reproducibility_tolerances(test_outputs),
                "architecture_type": "Twin-VAE encoder + regressor",
                "architecture_description": (
                    "Natural-domain outer encoder (4 strided 5x5 convolutions), shared encoder "
                    "(5x5 convolution, linear layer to the latent mean mu) and an MLP regressor "
                    "from mu to the cell count; "
                    + (
                        f"the whole Twin-VAE (also the synthetic encoder and the decoders) is "
                        f"attached as {FULL_WEIGHTS_FILE} for fine-tuning."
                        if FULL_WEIGHTS_FILE in hashes
                        else "the VAE decoders are not part of the export."
                    )
                ),
                "modality": f"{name_of_modality} microscopy",
                "target_structure": ["cells"],
                "task": "cell counting (image-level regression)",
                "model_parameter_count": parameter_count,
                "training": _training_details(config, epoch),
            },
            "twinvae": {
                **twinvae_info,
                "domain": spec.domain,
                "max_count": config.data.max_count,
                "with_mu": spec.with_mu,
            },
        },
    }
