"""The fused C kernel (LeakyReLU + dropout): same function as PyTorch's ops, reproducible,
independent of the thread count, and a clean fallback when it cannot be compiled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from twinvae.models import cpu_kernels

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason="no C compiler: the fused CPU kernels are not built"
)


def _reference(x: torch.Tensor, kept: torch.Tensor, slope: float, p: float) -> torch.Tensor:
    """LeakyReLU, then the given dropout mask, computed in float64."""
    return F.leaky_relu(x.double(), slope) * kept.double() / (1.0 - p)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_leaky_dropout_is_leaky_relu_then_inverted_dropout(
    dtype: torch.dtype, channels_last: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16, 31, 33, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = cpu_kernels.leaky_dropout(x, 0.2, 0.25)
    assert y.dtype == dtype and y.stride() == x.stride()
    kept = y.detach() != 0
    assert abs(float(kept.double().mean()) - 0.75) < 0.01
    tolerance = {"rtol": 1e-2, "atol": 1e-6} if dtype == torch.bfloat16 else {}
    expected = _reference(x.detach(), kept, 0.2, 0.25)
    torch.testing.assert_close(y.double(), expected, **tolerance)

    upstream = torch.randn_like(y)
    y.backward(upstream)
    leaf = x.detach().double().requires_grad_()
    _reference(leaf, kept, 0.2, 0.25).backward(upstream.double())
    assert x.grad is not None and leaf.grad is not None
    torch.testing.assert_close(x.grad.double(), leaf.grad, **tolerance)


@needs_kernels
def test_leaky_dropout_is_reproducible_and_independent_of_threads() -> None:
    x = torch.randn(4, 32, 64, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            torch.manual_seed(7)
            results.append(cpu_kernels.leaky_dropout(x, 0.2, 0.1))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(result, results[0]) for result in results)
    assert not torch.equal(cpu_kernels.leaky_dropout(x, 0.2, 0.1), results[0])  # next seed
    dropped = (results[0] == 0).double().mean()
    assert abs(float(dropped) - 0.1) < 0.005


@needs_kernels
def test_leaky_dropout_in_place_keeps_gradients_right() -> None:
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(2, 4, 3)
    x = torch.randn(3, 2, 12, 12)
    features = conv(x)
    y = cpu_kernels.leaky_dropout(features, 0.2, 0.5, inplace=True)
    assert y.data_ptr() == features.data_ptr()
    kept = y.detach() != 0
    y.square().sum().backward()
    assert conv.weight.grad is not None
    in_place = conv.weight.grad.clone()
    conv.weight.grad = None
    _reference(conv(x), kept, 0.2, 0.5).square().sum().backward()
    torch.testing.assert_close(in_place, conv.weight.grad.float(), rtol=1e-4, atol=1e-5)


def test_without_a_compiler_the_kernels_are_off_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TWINVAE_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable"):
        assert not cpu_kernels.available()
    assert not cpu_kernels.supports(torch.ones(4))  # no second warning: result is cached
    assert not (tmp_path / "cache").exists()


def test_kernels_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setenv("TWINVAE_CPU_KERNELS", "0")
    assert cpu_kernels.library() is None


@needs_kernels
def test_kernels_are_compiled_once_into_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setenv("TWINVAE_CACHE", str(tmp_path))
    assert cpu_kernels.available()
    built = list(tmp_path.glob("kernels/*/cpu_kernels.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    assert cpu_kernels.available()
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


@needs_kernels
def test_training_forward_uses_the_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from twinvae.config import ModelConfig
    from twinvae.models.twin_vae import TwinVAE

    calls: list[tuple[int, ...]] = []
    fused = cpu_kernels.leaky_dropout

    def counting(x: torch.Tensor, slope: float, p: float, inplace: bool = False) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return fused(x, slope, p, inplace)

    monkeypatch.setattr(cpu_kernels, "leaky_dropout", counting)
    model = TwinVAE(ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,)))
    model.fast_kernels = True
    output = model(torch.rand(2, 1, 128, 128), "natural")
    assert output.recon is not None
    output.recon.mean().backward()
    # the four outer encoder blocks, the shared encoder block and the regressor's hidden layer
    assert (2, 4, 62, 62) in calls and len(calls) == 6
    model.eval()
    calls.clear()
    model(torch.rand(2, 1, 128, 128), "natural")
    assert calls == []  # no dropout at inference
