"""Checkpoints: atomic writes, safe loading (weights_only), config embedded as YAML."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from twinvae.config import ExperimentConfig, config_from_dict
from twinvae.errors import CheckpointError
from twinvae.fileio import atomic_writer
from twinvae.models.twin_vae import TwinVAE

CHECKPOINT_FORMAT = "twinvae-checkpoint/1"


# trainer_state entries only a resume reads (best.pt leaves them out)
RESUME_ONLY_TRAINER_STATE = ("scaler",)


@dataclass
class Checkpoint:
    """What a checkpoint holds; every field is plain data or tensors (loadable weights_only).

    No RNG state: every epoch reseeds from the run's seed (`trainer.epoch_seed`), so a resume
    needs none. ``runtime`` records how the run computed (`runtime_record.describe_runtime`);
    ``working_dir`` is where it started, which relative data paths of its config refer to.
    """

    config: ExperimentConfig
    model_state: dict[str, torch.Tensor]
    epoch: int = 0
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    trainer_state: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config_yaml": self.config.to_yaml(),
            "epoch": self.epoch,
            "model": self.model_state,
            "optimizer": self.optimizer_state,
            "scheduler": self.scheduler_state,
            "metrics": self.metrics,
            "trainer": self.trainer_state,
            "runtime": self.runtime,
            "working_dir": self.working_dir,
        }

    def for_inference(self) -> Checkpoint:
        """This checkpoint without what only a resume needs (optimizer, scheduler and scaler
        state, the working directory): what best.pt holds for evaluation, export, transfer."""
        trainer_state = {
            key: value
            for key, value in self.trainer_state.items()
            if key not in RESUME_ONLY_TRAINER_STATE
        }
        return replace(
            self,
            optimizer_state=None,
            scheduler_state=None,
            trainer_state=trainer_state,
            working_dir=None,
        )


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
        metrics=dict(payload.get("metrics") or {}),
        trainer_state=dict(payload.get("trainer") or {}),
        runtime={str(k): str(v) for k, v in (payload.get("runtime") or {}).items()},
        working_dir=payload.get("working_dir"),
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
