"""Counts from a Twin-VAE in PyTorch (checkpoints; bundles go through ONNX Runtime)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from twinvae.models.twin_vae import TwinVAE
from twinvae.training.augment import dihedral_views
from twinvae.training.data import to_tensor

if TYPE_CHECKING:
    from twinvae.training.device import Runtime


@torch.no_grad()
def predict_counts(
    model: TwinVAE,
    images: np.ndarray,
    runtime: Runtime,
    *,
    domain: str = "natural",
    batch_size: int = 256,
    tta: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """Deterministic counts (mu, eval mode) for uint8 (N, H, W) images."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_tensor(images[start : start + batch_size], runtime.device, channels_last)
        views = dihedral_views(batch) if tta else [batch]
        with runtime.autocast():
            counts = torch.stack([model.count(v, domain).float() for v in views]).mean(0)  # type: ignore[arg-type]
        out.append(counts.cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
