"""Training speed: the benchmark's per-sample PIL baseline pipeline, the CPU precision choice
and the fused optimiser (the accelerated layers: test_accel.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

from twinvae.config import OptimConfig
from twinvae.training import device as device_module
from twinvae.training.trainer import make_optimizer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_training", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_training"] = module
    spec.loader.exec_module(module)
    return module


def test_precision_auto_uses_bf16_only_with_bf16_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for has_bf16 in (True, False):
        monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda has=has_bf16: has)
        assert device_module.select_precision("auto", cpu) == ("bf16" if has_bf16 else "fp32")
        assert device_module.select_precision("fp32", cpu) == "fp32"
    assert device_module.select_precision("auto", torch.device("cuda", 0)) == "fp16"


def test_adam_is_fused_and_radam_is_not() -> None:
    model = nn.Linear(3, 2)
    assert make_optimizer(model, OptimConfig(optimizer="adam")).param_groups[0]["fused"]
    assert make_optimizer(model, OptimConfig(optimizer="adamw")).param_groups[0]["fused"]
    assert "fused" not in make_optimizer(model, OptimConfig(optimizer="radam")).param_groups[0]


def test_pil_baseline_dataset_augments_each_image() -> None:
    bench = _bench()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (4, 128, 128), dtype=np.uint8)
    dataset = bench.PilAugmentDataset(images, np.array([1, 2, 3, 0]), seed=5)
    assert len(dataset) == 4
    tensor, count = dataset[2]
    assert tensor.shape == (1, 128, 128) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    assert float(count) == 3.0
    original = torch.from_numpy(images[2] / 255.0).float()
    assert not torch.allclose(tensor[0], original, atol=0.05)
    assert abs(float(tensor.mean()) - float(original.mean())) < 0.05
    args = bench.parse_args(["--quick"])
    assert (args.warmup, args.rounds, args.steps) == (1, 2, 1)
    assert not args.one_process  # each side in its own process unless asked
