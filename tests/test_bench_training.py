"""Training speed: the fast training kernels compute the reference function, the benchmark's
per-sample PIL baseline pipeline, and the CPU precision choice."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twinvae.config import ModelConfig, OptimConfig
from twinvae.models.twin_vae import TwinVAE, conv_transpose_by_phases, fast_dropout
from twinvae.training import device as device_module
from twinvae.training.trainer import make_optimizer

TINY = ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,))
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_training", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_training"] = module
    spec.loader.exec_module(module)
    return module


def _without_dropout(model: TwinVAE) -> TwinVAE:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return model


@pytest.mark.parametrize("c_kernels", [True, False])  # False: as without a C compiler
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("regressor_input", ["latent", "shared_decoder"])
def test_fast_kernels_compute_the_reference_function(
    channels_last: bool, regressor_input: str, c_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twinvae.models import cpu_kernels

    if not c_kernels:
        monkeypatch.setattr(cpu_kernels, "_loaded", True)
        monkeypatch.setattr(cpu_kernels, "_library", None)
    torch.manual_seed(0)
    reference = TwinVAE(TINY.model_copy(update={"regressor_input": regressor_input}))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    reference = reference.to(memory_format=layout)  # type: ignore[call-overload]
    fast = copy.deepcopy(reference)
    fast.fast_kernels = True
    assert fast.fast_kernels and not reference.fast_kernels
    assert fast.state_dict().keys() == reference.state_dict().keys()
    images = torch.rand(3, 1, 128, 128).contiguous(memory_format=layout)

    for model in (reference, fast):
        model.eval()
    torch.testing.assert_close(fast.count(images), reference.count(images))
    torch.testing.assert_close(
        fast.translate(images, "natural", "synthetic"),
        reference.translate(images, "natural", "synthetic"),
    )

    outputs = [_without_dropout(m)(images, "synthetic", sample=False) for m in (reference, fast)]
    for output in outputs:
        assert output.recon is not None
        (output.recon.square().sum() + output.count.sum() + output.logvar.sum()).backward()
    torch.testing.assert_close(outputs[1].recon, outputs[0].recon)
    for (name, ref_buffer), new_buffer in zip(
        reference.named_buffers(), fast.buffers(), strict=True
    ):  # batch-norm running statistics, also where fast_kernels skip a cancelled bias
        torch.testing.assert_close(new_buffer, ref_buffer, msg=name)
    for (name, ref), new in zip(reference.named_parameters(), fast.parameters(), strict=True):
        assert (ref.grad is None) == (new.grad is None), name
        if ref.grad is not None and not name.endswith("bias"):  # biases before BatchNorm: ~0
            scale = float(ref.grad.abs().max())
            torch.testing.assert_close(new.grad, ref.grad, rtol=0, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("channels_last", [False, True])  # True: the fused C kernel, if built
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bias_before_batch_norm_is_skipped_exactly(
    momentum: float | None, channels_last: bool
) -> None:
    """fast_kernels do not add a transposed convolution's bias that the next batch norm
    removes; outputs, gradients and running statistics stay those of the reference."""
    from twinvae.models.twin_vae import _FastSequential

    torch.manual_seed(5)
    reference = _FastSequential(
        nn.ConvTranspose2d(3, 4, kernel_size=3, stride=2),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.LeakyReLU(0.2),
    )
    with torch.no_grad():
        reference[0].bias.copy_(torch.tensor([3.0, -2.0, 0.5, 1.0]))
    fast = copy.deepcopy(reference)
    fast.fast_kernels = True
    x = torch.randn(2, 3, 5, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for step in range(2):
        outputs = [model(x + step) for model in (reference, fast)]
        torch.testing.assert_close(outputs[1], outputs[0])
        for output in outputs:
            output.square().sum().backward()
    assert fast[1].running_mean.abs().max() > 0.5  # the bias shows in the running mean
    states = [[*model.buffers(), *model.parameters()] for model in (reference, fast)]
    for ref_tensor, new_tensor in zip(*states, strict=True):
        torch.testing.assert_close(new_tensor, ref_tensor)
    named = zip(reference.named_parameters(), fast.parameters(), strict=True)
    for (name, ref_param), new_param in named:
        assert ref_param.grad is not None and new_param.grad is not None
        if name != "0.bias":  # float rounding, relative to the largest entry
            scale = float(ref_param.grad.abs().max())
            torch.testing.assert_close(new_param.grad, ref_param.grad, atol=2e-5 * scale, rtol=0)
    # the reference's bias gradient is rounding noise around the exact value 0
    scale = float(reference[0].weight.grad.abs().max())
    assert float(reference[0].bias.grad.abs().max()) < 1e-4 * scale
    assert torch.equal(fast[0].bias.grad, torch.zeros(4))
    fast.eval()
    reference.eval()
    torch.testing.assert_close(fast(x), reference(x))


def test_fast_kernels_follow_bf16_autocast() -> None:
    torch.manual_seed(1)
    reference = TwinVAE(TINY).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fast = copy.deepcopy(reference)
    fast.fast_kernels = True
    images = torch.rand(4, 1, 128, 128).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _without_dropout(reference)(images, "natural", sample=False)
        output = _without_dropout(fast)(images, "natural", sample=False)
    assert output.recon is not None and expected.recon is not None
    assert output.recon.dtype == torch.bfloat16
    torch.testing.assert_close(output.recon.float(), expected.recon.float(), atol=0.02, rtol=0)
    output.recon.float().mean().backward()
    used = [*fast.encoders["natural"].parameters(), *fast.decoders["natural"].parameters()]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in used)


@pytest.mark.parametrize(
    ("c_in", "c_out", "kernel", "stride", "channels_last", "bias"),
    [(6, 1, 6, 2, True, True), (3, 2, 4, 2, False, False), (5, 1, 6, 3, True, True)],
)
def test_transposed_convolution_by_phases_matches_torch(
    c_in: int, c_out: int, kernel: int, stride: int, channels_last: bool, bias: bool
) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, c_in, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_in, c_out, kernel, kernel, dtype=torch.float64)
    inputs = [x, weight] + ([torch.randn(c_out, dtype=torch.float64)] if bias else [])
    leaves = [[t.clone().requires_grad_() for t in inputs] for _ in range(2)]
    expected = F.conv_transpose2d(*leaves[0][:2], leaves[0][2] if bias else None, stride=stride)
    output = conv_transpose_by_phases(
        *leaves[1][:2], leaves[1][2] if bias else None, (stride, stride)
    )
    torch.testing.assert_close(output, expected)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (output * upstream).sum().backward()
    for reference, new in zip(leaves[0], leaves[1], strict=True):
        assert reference.grad is not None and new.grad is not None
        torch.testing.assert_close(new.grad, reference.grad)


def test_fast_dropout_is_inverted_dropout_and_reproducible() -> None:
    x = torch.ones(64, 32, 30, 30).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    first = fast_dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(fast_dropout(x, 0.1), first)
    assert not torch.equal(fast_dropout(x, 0.1), first)
    assert first.is_contiguous(memory_format=torch.channels_last)
    dropped = float((first == 0).float().mean())
    assert abs(dropped - 0.1) < 0.005
    assert first.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert fast_dropout(x, 0.0) is x
    half = fast_dropout(torch.ones(1000, 100, dtype=torch.bfloat16), 0.5)
    assert half.dtype == torch.bfloat16 and abs(float(half.float().mean()) - 1.0) < 0.05


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
