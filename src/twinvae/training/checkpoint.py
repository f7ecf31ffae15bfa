"""Checkpoints: atomic writes, safe loading (weights_only), config embedded as YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from twinvae.config import ExperimentConfig, config_from_dict
from twinvae.errors import CheckpointError
from twinvae.fileio import atomic_writer
from twinvae.models.twin_vae import TwinVAE

CHECKPOINT_FORMAT = "twinvae-checkpoint/1"


@dataclass
class Checkpoint:
    """What a checkpoint holds; every field is plain data or tensors (loadable weights_only)."""

    config: ExperimentConfig
    model_state: dict[str, torch.Tensor]
    epoch: int = 0
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    trainer_state: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config_yaml": self.config.to_yaml(),
            "epoch": self.epoch,
            "model": self.model_state,
            "optimizer": self.optimizer_state,
            "scheduler": self.scheduler_state,
            "rng": self.rng_state,
            "metrics": self.metrics,
            "trainer": self.trainer_state,
        }


def atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    with atomic_writer(path, binary=True) as stream:
        torch.save(payload, stream)


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    atomic_torch_save(checkpoint.to_payload(), path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if path.is_dir():
        for candidate in ("best.pt", "last.pt"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise CheckpointError(f"{path}: run folder holds neither best.pt nor last.pt")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable twinvae checkpoint ({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a twinvae checkpoint (expected {CHECKPOINT_FORMAT})")
    config = config_from_dict(yaml.safe_load(payload["config_yaml"]), origin=f"{path} (config)")
    return Checkpoint(
        config=config,
        model_state=payload["model"],
        epoch=int(payload["epoch"]),
        optimizer_state=payload.get("optimizer"),
        scheduler_state=payload.get("scheduler"),
        rng_state=payload.get("rng"),
        metrics=dict(payload.get("metrics") or {}),
        trainer_state=dict(payload.get("trainer") or {}),
    )


def load_model(path: str | Path) -> tuple[TwinVAE, Checkpoint]:
    """A TwinVAE in eval mode with the checkpoint's weights, and the checkpoint itself."""
    checkpoint = load_checkpoint(path)
    model = TwinVAE(checkpoint.config.model)
    try:
        model.load_state_dict(checkpoint.model_state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: weights do not fit the configured model: {error}"
        ) from error
    model.eval()
    return model, checkpoint
