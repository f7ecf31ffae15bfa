"""twinvae.accel: `accelerate` swaps layers without changing keys or the function (fp32 up to
rounding, bf16 within its tolerance), independent passes, and the threaded step's check."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from twinvae.accel import (
    NotAcceleratedError,
    accelerate,
    apply_running_updates,
    cpu_kernels,
    generator,
    independent_pass,
    require_independent_passes,
    thread_unsafe_layers,
)
from twinvae.accel.functional import conv_transpose_by_phases, fast_dropout
from twinvae.accel.modules import Conv2dAsLinear, PixelConvTranspose2d
from twinvae.config import ExperimentConfig, ModelConfig
from twinvae.models.twin_vae import TwinVAE
from twinvae.training.device import Runtime
from twinvae.training.steps import DomainPasses

TINY = ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,))


def _without_dropout(model: nn.Module) -> nn.Module:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()  # an accelerated LeakyReLU + dropout still applies its LeakyReLU
    return model


def _no_c_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """As without a C compiler."""
    monkeypatch.setattr(cpu_kernels, "_loaded", True)
    monkeypatch.setattr(cpu_kernels, "_library", None)


def test_accelerate_keeps_keys_and_parameters_and_changes_nothing_twice() -> None:
    torch.manual_seed(0)
    model = TwinVAE(TINY)
    plain = copy.deepcopy(model)
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    network = model.counting_network()  # made before: shares the very modules
    assert thread_unsafe_layers(model)
    assert accelerate(model) is model
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(parameters[n] is p for n, p in model.named_parameters())
    assert all(buffers[n] is b for n, b in model.named_buffers())
    assert isinstance(network.shared_encoder.conv[0], Conv2dAsLinear)
    assert thread_unsafe_layers(model) == []
    layout = repr(model)
    accelerate(model)
    assert repr(model) == layout
    plain.load_state_dict(model.state_dict())  # checkpoints go both ways
    model.load_state_dict(plain.state_dict())


def test_off_the_cpu_only_the_shared_one_pixel_layers_change() -> None:
    model = accelerate(TwinVAE(TINY), "cuda")  # nothing runs: no CUDA device needed
    assert isinstance(model.shared_encoder.conv[0], Conv2dAsLinear)
    assert isinstance(model.shared_decoder.deconv[0], PixelConvTranspose2d)
    changed = {type(m).__module__ for m in model.modules()} - {"twinvae.accel.modules"}
    assert all(not name.startswith("twinvae.accel") for name in changed)
    assert "shared_decoder.deconv.1 (BatchNorm2d)" in thread_unsafe_layers(model)


@pytest.mark.parametrize("c_kernels", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("regressor_input", ["latent", "shared_decoder"])
def test_accelerated_model_computes_the_plain_function(
    channels_last: bool, regressor_input: str, c_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not c_kernels:
        _no_c_kernels(monkeypatch)
    torch.manual_seed(0)
    plain = TwinVAE(TINY.model_copy(update={"regressor_input": regressor_input}))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    plain = plain.to(memory_format=layout)  # type: ignore[call-overload]
    fast = accelerate(copy.deepcopy(plain))
    images = torch.rand(3, 1, 128, 128).contiguous(memory_format=layout)

    for model in (plain, fast):
        model.eval()
    torch.testing.assert_close(fast.count(images), plain.count(images))
    torch.testing.assert_close(
        fast.translate(images, "natural", "synthetic"),
        plain.translate(images, "natural", "synthetic"),
    )

    outputs = [_without_dropout(m)(images, "synthetic", sample=False) for m in (plain, fast)]
    for output in outputs:
        assert output.recon is not None
        (output.recon.square().sum() + output.count.sum() + output.logvar.sum()).backward()
    torch.testing.assert_close(outputs[1].recon, outputs[0].recon)
    for (name, ref_buffer), new_buffer in zip(plain.named_buffers(), fast.buffers(), strict=True):
        # batch-norm running statistics, also where a cancelled bias is skipped
        torch.testing.assert_close(new_buffer, ref_buffer, msg=name)
    for (name, ref), new in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert (ref.grad is None) == (new.grad is None), name
        if ref.grad is not None and not name.endswith("bias"):  # biases before BatchNorm: ~0
            scale = float(ref.grad.abs().max())
            torch.testing.assert_close(new.grad, ref.grad, rtol=0, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("regressor_input", ["latent", "shared_decoder"])
def test_accelerated_model_matches_the_plain_one_within_bf16_tolerance(
    regressor_input: str,
) -> None:
    """Under bf16 autocast: outputs within bf16 rounding of the plain model's, and gradients
    as close to the fp32 gradients as the plain model's bf16 gradients are."""
    torch.manual_seed(1)
    plain = TwinVAE(TINY.model_copy(update={"regressor_input": regressor_input}))
    plain = plain.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fast, fp32 = accelerate(copy.deepcopy(plain)), copy.deepcopy(plain)
    images = torch.rand(4, 1, 128, 128).contiguous(memory_format=torch.channels_last)
    outputs, grads = {}, {}
    for name, model in (("plain", plain), ("fast", fast), ("fp32", fp32)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "fp32"):
            output = _without_dropout(model)(images, "natural", sample=False)
        assert output.recon is not None
        (output.recon.float().mean() + output.count.float().mean()).backward()
        outputs[name] = output
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert outputs["fast"].recon is not None and outputs["fast"].recon.dtype == torch.bfloat16
    for key in ("recon", "mu", "logvar", "count"):
        new, ref = getattr(outputs["fast"], key).float(), getattr(outputs["plain"], key).float()
        scale = max(1.0, float(ref.detach().abs().max()))
        torch.testing.assert_close(new, ref, atol=0.02 * scale, rtol=0, msg=key)
    assert grads["fast"].keys() == grads["plain"].keys() == grads["fp32"].keys()
    for name, exact in grads["fp32"].items():
        assert grads["fast"][name].dtype == torch.float32, name
        if name.endswith("bias"):  # biases before batch norms: rounding noise around 0
            continue
        size = float(exact.norm())
        plain_error = float((grads["plain"][name] - exact).norm())
        fast_error = float((grads["fast"][name] - exact).norm())
        assert fast_error <= 2 * plain_error + 0.02 * size, name


@pytest.mark.parametrize("channels_last", [False, True])  # True: the fused C kernel, if built
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bias_before_batch_norm_is_skipped_exactly(
    momentum: float | None, channels_last: bool
) -> None:
    """An accelerated transposed convolution does not add the bias that the next batch norm
    removes; outputs, gradients and running statistics stay those of the plain layers."""
    torch.manual_seed(5)
    plain = nn.Sequential(
        nn.ConvTranspose2d(3, 4, kernel_size=3, stride=2),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.LeakyReLU(0.2),
    )
    with torch.no_grad():
        plain[0].bias.copy_(torch.tensor([3.0, -2.0, 0.5, 1.0]))
    fast = accelerate(copy.deepcopy(plain))
    x = torch.randn(2, 3, 5, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for step in range(2):
        outputs = [model(x + step) for model in (plain, fast)]
        torch.testing.assert_close(outputs[1], outputs[0])
        for output in outputs:
            output.square().sum().backward()
    assert fast[1].running_mean.abs().max() > 0.5  # the bias shows in the running mean
    states = [[*model.buffers(), *model.parameters()] for model in (plain, fast)]
    for ref_tensor, new_tensor in zip(*states, strict=True):
        torch.testing.assert_close(new_tensor, ref_tensor)
    named = zip(plain.named_parameters(), fast.parameters(), strict=True)
    for (name, ref_param), new_param in named:
        assert ref_param.grad is not None and new_param.grad is not None
        if name != "0.bias":  # float rounding, relative to the largest entry
            scale = float(ref_param.grad.abs().max())
            torch.testing.assert_close(new_param.grad, ref_param.grad, atol=2e-5 * scale, rtol=0)
    # the plain bias gradient is rounding noise around the exact value 0
    scale = float(plain[0].weight.grad.abs().max())
    assert float(plain[0].bias.grad.abs().max()) < 1e-4 * scale
    assert torch.equal(fast[0].bias.grad, torch.zeros(4))
    fast.eval()
    plain.eval()
    torch.testing.assert_close(fast(x), plain(x))


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


@pytest.mark.parametrize("c_kernels", [True, False])
def test_independent_pass_draws_from_its_generator_and_defers_running_statistics(
    c_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not c_kernels:
        _no_c_kernels(monkeypatch)
    torch.manual_seed(0)
    model = TwinVAE(TINY).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    accelerate(model)
    model.train()
    x = torch.rand(4, 1, 128, 128).contiguous(memory_format=torch.channels_last)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    global_state = torch.get_rng_state()
    outputs, pending = [], []
    for _ in range(2):
        with independent_pass(torch.Generator().manual_seed(7)) as updates:
            outputs.append(model(x, "natural"))
        pending.append(updates)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global generator is untouched
    assert torch.equal(outputs[0].z, outputs[1].z)  # same generator seed: same sample and masks
    assert outputs[0].recon is not None and outputs[1].recon is not None
    assert torch.equal(outputs[0].recon, outputs[1].recon)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name  # nothing applied yet
    assert len(pending[0]) == 5  # the shared decoder's batch norm and the outer decoder's four
    apply_running_updates(pending[0])
    norm = model.shared_decoder.deconv[1]
    assert int(norm.num_batches_tracked) == 1
    assert not torch.equal(norm.running_mean, buffers["shared_decoder.deconv.1.running_mean"])
    with torch.no_grad():
        direct = model(x, "natural", sample=False)  # outside a pass: applied at once
    assert direct.recon is not None and int(norm.num_batches_tracked) == 2


def test_independent_passes_do_not_nest() -> None:
    with (
        independent_pass(torch.Generator()),
        pytest.raises(RuntimeError, match="do not nest"),
        independent_pass(torch.Generator()),
    ):
        pass
    assert generator() is None


def test_the_threaded_step_refuses_a_model_that_is_not_accelerated() -> None:
    config, runtime = ExperimentConfig(model=TINY), Runtime(torch.device("cpu"), "fp32")
    plain = TwinVAE(TINY)
    with ThreadPoolExecutor(2) as threads:
        with pytest.raises(NotAcceleratedError, match=r"shared_decoder\.deconv\.1 \(BatchNorm2d\)"):
            DomainPasses(plain, config, runtime, threads)
        with pytest.raises(NotAcceleratedError, match="accelerate"):
            require_independent_passes(plain)
        DomainPasses(accelerate(TwinVAE(TINY)), config, runtime, threads)
    DomainPasses(plain, config, runtime, None)  # one pass after the other: no race
