"""Training and inference on a CUDA device: fp16 autocast with loss scaling, channels_last,
pinned host copies, checkpoints that load on the CPU. Skipped without CUDA; on a GPU machine
``benchmarks/gpu_check.py`` runs them (``pytest -m cuda``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from twinvae.config import load_config
from twinvae.models.twin_vae import TwinVAE
from twinvae.training.checkpoint import load_checkpoint
from twinvae.training.data import to_tensor
from twinvae.training.device import Runtime, select_precision
from twinvae.training.trainer import predict_counts, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TINY = [
    "model.base_channels=4",
    "model.latent_dim=8",
    "model.regressor_hidden=[8]",
    "data.generated_natural_count=40",
    "data.generated_natural_labelled=20",
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.batch_size=8",
    "train.device=cuda",
]


def test_auto_precision_is_fp16_on_cuda() -> None:
    assert select_precision("auto", torch.device("cuda")) == "fp16"


def test_to_tensor_on_cuda_matches_the_cpu_copy() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 128, 128), dtype=np.uint8)
    on_device = to_tensor(images, torch.device("cuda"), channels_last=True)
    assert on_device.is_cuda
    assert on_device.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        on_device.cpu(), to_tensor(images, torch.device("cpu"), channels_last=True)
    )


def test_cuda_training_checkpoint_predicts_the_same_on_the_cpu(tmp_path: Path) -> None:
    config = load_config("quick-cpu", TINY)
    result = train(config, tmp_path / "run", progress=False)
    assert result.epochs_run == 2
    assert all(math.isfinite(float(row["loss"])) for row in result.history)
    assert math.isfinite(result.best_val_mae)

    checkpoint = load_checkpoint(result.last_checkpoint)
    images = np.random.default_rng(1).integers(0, 256, (16, 128, 128), dtype=np.uint8)
    counts = {}
    for device in ("cpu", "cuda"):
        model = TwinVAE(checkpoint.config.model)
        model.load_state_dict(checkpoint.model_state)
        model.to(device)
        counts[device] = predict_counts(model, images, Runtime(torch.device(device), "fp32"))
    # cuDNN may use TF32 for convolutions: equal within float tolerance, not bit for bit
    np.testing.assert_allclose(counts["cuda"], counts["cpu"], rtol=1e-2, atol=1e-2)


def test_fp16_autocast_counts_match_fp32_on_cuda() -> None:
    torch.manual_seed(0)
    model = TwinVAE(load_config("quick-cpu", TINY).model).cuda()
    model.regressor.start_at(10.0)
    images = np.random.default_rng(2).integers(0, 256, (32, 128, 128), dtype=np.uint8)
    device = torch.device("cuda")
    full = predict_counts(model, images, Runtime(device, "fp32"))
    half = predict_counts(model, images, Runtime(device, "fp16"), channels_last=True)
    assert half.dtype == np.float32 and np.isfinite(half).all()
    np.testing.assert_allclose(half, full, rtol=2e-2, atol=5e-2)
