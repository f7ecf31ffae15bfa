"""Short trainings repeat the numbers recorded before the models / accel split.

tests/data/reference_numbers.json holds per-step losses and gradient norms, validation MAE and
the norm of the batch-norm running statistics of tiny-model trainings on generated data, made
by the code of the commit it names (then ``TwinVAE.fast_kernels``, now `accelerate`): the
trainer (accelerated, domain passes) in fp32 and bf16, and a plain loop over the model alone,
plain and accelerated (with and without the C kernels, channels-last and contiguous). On the
recording machine they agree bit for bit; elsewhere floats differ in the last bits, so they are
compared within a tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from twinvae.accel import accelerate, cpu_kernels
from twinvae.config import ExperimentConfig, ModelConfig, config_from_dict
from twinvae.data.imageset import ImageSet
from twinvae.models.twin_vae import TwinVAE
from twinvae.training.augment import augment_batch
from twinvae.training.data import TrainingData, to_tensor
from twinvae.training.losses import twin_domain_loss
from twinvae.training.trainer import Trainer

RECORDED = json.loads(
    (Path(__file__).parent / "data" / "reference_numbers.json").read_text(encoding="utf-8")
)["runs"]
TINY_MODEL = {"base_channels": 4, "latent_dim": 8, "regressor_hidden": [8]}
STEPS, BATCH = 4, 8


def _image_set(n: int, seed: int, domain: str, labelled_share: float = 1.0) -> ImageSet:
    """Images whose bright area grows with the count."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 9, n)
    images = (rng.random((n, 128, 128)) * 40).astype(np.uint8)
    for i, count in enumerate(counts):
        images[i, : count * 8, :] += 120
    counts[int(n * labelled_share) :] = 0
    names = [f"e01xy{i % 4:02d}t{i:03d}c1.png" for i in range(n)]
    return ImageSet(images, counts, names, domain=domain)  # type: ignore[arg-type]


def _data() -> TrainingData:
    return TrainingData(
        natural_train=_image_set(48, 0, "natural", labelled_share=0.5),
        natural_val=_image_set(12, 1, "natural"),
        synthetic=_image_set(48, 2, "synthetic"),
        synthetic_val=None,
    )


def _config(precision: str) -> ExperimentConfig:
    return config_from_dict(
        {
            "model": TINY_MODEL,
            "data": {"synthetic": "stored"},
            "optim": {"lr": 1e-3},
            "train": {
                "epochs": STEPS,
                "batch_size": BATCH,
                "steps_per_epoch": 1,
                "device": "cpu",
                "precision": precision,
                "early_stopping_patience": None,
            },
        }
    )


def _grad_norm(parameters: Iterable[torch.Tensor]) -> float:
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _buffer_norm(model: torch.nn.Module) -> float:
    buffers = [b.float().norm() for name, b in model.named_buffers() if "running" in name]
    return float(torch.linalg.vector_norm(torch.stack(buffers)))


def _trainer_run(precision: str, run_dir: Path) -> dict[str, Any]:
    """`Trainer` steps (accelerated model, domain passes), one step per epoch."""
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        norms.append(_grad_norm(p for group in optimizer.param_groups for p in group["params"]))

    handle = register_optimizer_step_pre_hook(record)
    try:
        trainer = Trainer(_config(precision), run_dir, data=_data(), progress=False)
        result = trainer.fit()
    finally:
        handle.remove()
    return {
        "loss": [row["loss"] for row in result.history],
        "grad_norm": norms,
        "val_mae": [row["val_mae"] for row in result.history],
        "buffer_norm": _buffer_norm(trainer.model),
    }


def _loop_run(accelerated: bool, channels_last: bool) -> dict[str, Any]:
    """A plain training loop over the model alone: global RNG, both domains, one backward."""
    cfg, sets, device = _config("fp32"), _data(), torch.device("cpu")
    torch.manual_seed(0)
    model = TwinVAE(ModelConfig(**TINY_MODEL))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.regressor.start_at(4.0)
    if accelerated:
        accelerate(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    generator = torch.Generator().manual_seed(1)
    losses, norms = [], []
    for step in range(STEPS):
        rng = np.random.default_rng(step)
        model.train()
        total = torch.zeros(())
        for domain, images in (("natural", sets.natural_train), ("synthetic", sets.synthetic)):
            index = rng.choice(len(images), BATCH, replace=False)
            x = to_tensor(images.images[index], device, channels_last)
            x = augment_batch(x, cfg.augment, generator)
            counts = torch.from_numpy(images.counts[index].astype(np.float32))
            output = model(x, domain)  # type: ignore[arg-type]
            loss = twin_domain_loss(
                output, x, counts, cfg.loss, rec_weight=cfg.loss.rec_weight, regressor_on=True
            )
            total = total + loss.total
        total.backward()
        losses.append(float(total.detach()))
        norms.append(_grad_norm(model.parameters()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    val = sets.natural_val
    with torch.no_grad():
        predicted = model.count(to_tensor(val.images, device, channels_last))
    mae = float((predicted - torch.from_numpy(val.counts).float()).abs().mean())
    return {"loss": losses, "grad_norm": norms, "val_mae": mae, "buffer_norm": _buffer_norm(model)}


def _assert_repeats(numbers: dict[str, Any], recorded: dict[str, Any], rtol: float) -> None:
    assert numbers.keys() == recorded.keys()
    for key, value in recorded.items():
        np.testing.assert_allclose(numbers[key], value, rtol=rtol, atol=rtol, err_msg=key)


@pytest.mark.parametrize(("precision", "rtol"), [("fp32", 1e-3), ("bf16", 1e-2)])
def test_trainer_repeats_the_recorded_numbers(precision: str, rtol: float, tmp_path: Path) -> None:
    if not cpu_kernels.available():
        pytest.skip("the fused CPU kernels are not built (no C compiler)")
    recorded = RECORDED[f"trainer_fast_{precision}"]
    _assert_repeats(_trainer_run(precision, tmp_path / "run"), recorded, rtol)


@pytest.mark.parametrize(
    ("name", "accelerated", "channels_last", "c_kernels"),
    [
        ("loop_plain_channels_last", False, True, True),
        ("loop_fast_channels_last", True, True, True),
        ("loop_fast_contiguous", True, False, True),
        ("loop_fast_channels_last_no_c_kernels", True, True, False),
    ],
)
def test_training_loop_repeats_the_recorded_numbers(
    name: str,
    accelerated: bool,
    channels_last: bool,
    c_kernels: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if c_kernels and not cpu_kernels.available():
        pytest.skip("the fused CPU kernels are not built (no C compiler)")
    if not c_kernels:  # as without a C compiler
        monkeypatch.setattr(cpu_kernels, "_loaded", True)
        monkeypatch.setattr(cpu_kernels, "_library", None)
    _assert_repeats(_loop_run(accelerated, channels_last), RECORDED[name], rtol=1e-3)
