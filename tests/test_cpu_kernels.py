"""The fused C kernels: torch operators computing the function of PyTorch's ops, reproducible,
independent of the thread count, cached per CPU and compiler, and a clean fallback when they
cannot be compiled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from twinvae.accel import accelerate, cpu_kernels

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason="the fused CPU kernels are not built (no C compiler, or TWINVAE_CPU_KERNELS=0)",
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
    monkeypatch.delenv("TWINVAE_CPU_KERNELS", raising=False)
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


def _fingerprint_of_another_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine whose CPU lacks AVX-512 (a home folder shared with it)."""
    flags = " ".join(flag for flag in cpu_kernels.cpu_flags().split() if "avx512" not in flag)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags + " other-cpu")
    real = cpu_kernels._compiler_output

    def compiler_output(compiler: str, *arguments: str) -> str:
        output = real(compiler, *arguments)
        if "-march=native" in arguments:
            return "\n".join(line for line in output.splitlines() if "AVX512" not in line)
        return output

    monkeypatch.setattr(cpu_kernels, "_compiler_output", compiler_output)


def test_the_cache_key_covers_cpu_compiler_and_source(monkeypatch: pytest.MonkeyPatch) -> None:
    here = cpu_kernels.build_fingerprint("cc")
    key = cpu_kernels.cache_key(here)
    for field in ("source_sha256", "compiler_version", "cpu_flags", "native_target", "machine"):
        assert cpu_kernels.cache_key({**here, field: here[field] + " changed"}) != key, field
    with monkeypatch.context() as patch:
        _fingerprint_of_another_cpu(patch)
        other = cpu_kernels.build_fingerprint("cc")
    assert other["cpu_flags"] != here["cpu_flags"]
    assert cpu_kernels.cache_key(other) != key


@needs_kernels
def test_a_cache_shared_with_another_cpu_never_gives_it_this_cpus_binary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TWINVAE_CACHE", str(tmp_path))
    here = cpu_kernels._build("cc")
    stamp = here.stat().st_mtime_ns
    with monkeypatch.context() as patch:
        _fingerprint_of_another_cpu(patch)
        there = cpu_kernels._build("cc")
    assert there != here and there.parent.parent == here.parent.parent
    fingerprint = json.loads((there.parent / "fingerprint.json").read_text())
    assert "other-cpu" in fingerprint["cpu_flags"]
    assert cpu_kernels._build("cc") == here and here.stat().st_mtime_ns == stamp  # reused


@needs_kernels
def test_the_kernels_are_torch_operators() -> None:
    ops = torch.ops.twinvae
    x = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    a, b = torch.rand(4), torch.rand(4)
    dropout = (1, 2, 6554, 0.2, 1 / 0.9)
    cases = [
        (ops.leaky_dropout.default, (x, *dropout)),
        (ops.leaky_dropout_.default, (x.clone(), *dropout)),
        (ops.leaky_dropout_backward.default, (torch.randn_like(x), x, *dropout)),
        (ops.batch_norm_stats.default, (x,)),
        (ops.batch_norm_leaky.default, (x, a, b, 0.2)),
        (ops.batch_norm_leaky_backward_stats.default, (torch.randn_like(x), x, a, b, a, b, 0.2)),
        (
            ops.batch_norm_leaky_backward.default,
            (torch.randn_like(x), x, a, b, a, b, a, b, a, 0.2),
        ),
        (ops.add_noise.default, (torch.rand(3, 1, 8, 8), torch.rand(3), torch.rand(2**16), 3, 4)),
    ]
    for op, args in cases:  # schema (what it mutates), fake kernel, tracing
        torch.library.opcheck(op, args)
    with pytest.raises(ValueError, match="channels-last"):
        ops.batch_norm_leaky(x.contiguous(), a, b, 0.2)


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
    norms: list[int] = []
    fused_norm = cpu_kernels.batch_norm_leaky

    def counting_norm(
        x: torch.Tensor,
        norm: torch.nn.BatchNorm2d,
        slope: float,
        mean_shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        norms.append(x.shape[-1])
        return fused_norm(x, norm, slope, mean_shift)

    monkeypatch.setattr(cpu_kernels, "batch_norm_leaky", counting_norm)
    model = TwinVAE(ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,)))
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    accelerate(model)
    images = torch.rand(2, 1, 128, 128).contiguous(memory_format=torch.channels_last)
    output = model(images, "natural")
    assert output.recon is not None
    output.recon.mean().backward()
    # the four outer encoder blocks, the shared encoder block and the regressor's hidden layer
    assert (2, 4, 62, 62) in calls and len(calls) == 6
    assert norms == [5, 13, 29, 61, 62]  # the decoder's batch norms, by output size
    model.eval()
    calls.clear()
    norms.clear()
    model(images, "natural")
    assert calls == [] and norms == []  # no dropout and running statistics at inference


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("momentum", "affine"), [(0.1, True), (None, True), (0.1, False)])
def test_batch_norm_leaky_matches_torch(
    dtype: torch.dtype, momentum: float | None, affine: bool
) -> None:
    import copy

    torch.manual_seed(1)
    reference = torch.nn.BatchNorm2d(8, momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-0.5, 0.5)
    fused = copy.deepcopy(reference)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    for step in range(2):
        x = (torch.randn(4, 8, 9, 11) * 2 + step).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        leaves = [x.clone().requires_grad_() for _ in range(2)]
        expected = F.leaky_relu(reference(leaves[0]), 0.2)
        output = cpu_kernels.batch_norm_leaky(leaves[1], fused, 0.2)
        assert output.dtype == dtype and output.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(output.float(), expected.float(), **tolerance)
        upstream = torch.randn_like(expected)
        expected.backward(upstream)
        output.backward(upstream)
        assert leaves[0].grad is not None and leaves[1].grad is not None
        torch.testing.assert_close(leaves[1].grad.float(), leaves[0].grad.float(), **tolerance)
    for (name, ref), new in zip(reference.named_parameters(), fused.parameters(), strict=True):
        assert ref.grad is not None and new.grad is not None
        scale = float(ref.grad.abs().max())
        torch.testing.assert_close(new.grad, ref.grad, rtol=0, atol=1e-2 * scale, msg=name)
    for (name, ref), new in zip(reference.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(new, ref, msg=name)


@needs_kernels
def test_batch_norm_leaky_is_independent_of_threads() -> None:
    x = torch.randn(8, 16, 40, 40).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            norm = torch.nn.BatchNorm2d(16)
            leaf = x.clone().requires_grad_()
            output = cpu_kernels.batch_norm_leaky(leaf, norm, 0.2)
            output.square().sum().backward()
            assert leaf.grad is not None and norm.weight.grad is not None
            results.append((output, leaf.grad, norm.weight.grad, norm.running_var))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0], strict=True))


@needs_kernels
def test_add_noise_is_clamped_gaussian_noise_per_image_level() -> None:
    flat = torch.full((6, 1, 64, 64), 0.5).contiguous(memory_format=torch.channels_last)
    levels = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.1, 1.0])
    noisy = cpu_kernels.add_noise(flat, levels, torch.Generator().manual_seed(0))
    assert noisy.shape == flat.shape and noisy.stride() == flat.stride()
    deviation = (noisy - 0.5).flatten(1)
    assert torch.equal(noisy[0], flat[0])
    for index in range(1, 5):  # no clamping at these levels
        assert abs(float(deviation[index].std()) / float(levels[index]) - 1) < 0.03
        assert abs(float(deviation[index].mean())) < 0.05 * float(levels[index])
        kurtosis = float((deviation[index] / deviation[index].std()).pow(4).mean())
        assert abs(kurtosis - 3.0) < 0.3  # Gaussian, not uniform (1.8)
    assert float(noisy.min()) == 0.0 and float(noisy.max()) == 1.0  # level 1.0 is clamped
    again = cpu_kernels.add_noise(flat, levels, torch.Generator().manual_seed(0))
    assert torch.equal(again, noisy)
    other = cpu_kernels.add_noise(flat, levels, torch.Generator().manual_seed(1))
    assert not torch.equal(other, noisy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu_kernels.add_noise(flat, levels, torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, noisy)
