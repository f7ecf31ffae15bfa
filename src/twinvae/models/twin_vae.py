"""The Twin-VAE: two VAEs (natural, synthetic) sharing inner layers and a cell-count regressor.

Layer sizes follow the authors' reference implementation (Stallmann et al. 2021; Kenneweg,
Stallmann, Hammer 2023) for 128 x 128 grey images:

    outer encoder (per domain)  128 -> 62 -> 29 -> 13 -> 5 px, channels 1 -> c -> 2c -> 4c -> 8c
    shared encoder              5 -> 1 px, 8c -> 16c, then fc_mu / fc_logvar 16c -> latent
    shared decoder              latent -> 16c (fc), 1 -> 5 px, 16c -> 8c
    outer decoder (per domain)  5 -> 13 -> 29 -> 61 -> 62 -> 128 px, sigmoid output
    regressor                   latent -> 256 -> 128 -> 1 (raw count)

with c = base_channels (32 in the papers).

``TwinVAE.fast_kernels`` (off by default, switched on by the trainer) computes the same function
faster for training (equal up to float rounding): the two 1-pixel shared layers as matrix
products instead of convolutions; on the CPU, the outer decoders' transposed convolutions as the
input gradient of a convolution (oneDNN's kernels for that are about twice as fast), the last
one (to one channel) as one matrix product + shifted additions, the weight gradients of the
5-pixel layers as im2col + one matrix product, LeakyReLU + dropout and batch norm + LeakyReLU
as fused C kernels (`cpu_kernels`, compiled on first use; without a compiler, dropout masks from
numpy's SFC64 generator and LeakyReLU in place), dropout masks seeded from torch's RNG instead
of drawn by torch's per-element Mersenne twister (a different, equally random mask), and no
bias before a batch norm that cancels it. Measurements: benchmarks/README.md, "Training throughput".
Random draws and batch-norm running statistics go through `domain_pass`, so that the trainer
can run the two domains' passes side by side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twinvae.config import ModelConfig
from twinvae.models import cpu_kernels, domain_pass

DomainName = Literal["natural", "synthetic"]
DOMAINS: tuple[DomainName, DomainName] = ("natural", "synthetic")
MODEL_IMAGE_SIZE = 128


def _conv_block(c_in: int, c_out: int, cfg: ModelConfig) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=5, stride=2),
        nn.LeakyReLU(cfg.leaky_slope),
        nn.Dropout(cfg.dropout),
    ]


def _deconv_block(
    c_in: int, c_out: int, kernel: int, stride: int, cfg: ModelConfig
) -> list[nn.Module]:
    return [
        nn.ConvTranspose2d(c_in, c_out, kernel_size=kernel, stride=stride),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(cfg.leaky_slope),
    ]


_DROPOUT_BITS = 16


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout (training) with a mask from numpy's SFC64 generator.

    torch's CPU ``bernoulli_`` draws one Mersenne-twister number per element and costs more
    than the convolutions of the first layers; 16 random bits per element from SFC64 are about
    ten times cheaper. The generator is seeded from torch's RNG, so ``torch.manual_seed`` still
    makes a run reproducible. The drop probability is ``p`` rounded to a multiple of 2**-16.
    """
    if p <= 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    seed = int(torch.randint(0, 2**62, (1,), generator=domain_pass.generator()))
    n = x.numel()
    words = np.random.SFC64(seed).random_raw(-(-n // 4))
    keep = words.view(np.uint16)[:n] >= round(p * 2**_DROPOUT_BITS)
    multiplier = _keep_multiplier(keep, 1.0 / (1.0 - p), x.dtype)
    dense = cpu_kernels.is_dense(x)
    # the mask is i.i.d., so laying it out in x's memory order is as good as any order
    return x * (multiplier.as_strided(x.shape, x.stride()) if dense else multiplier.view(x.shape))


_SAME_SIZE_INT: dict[
    int, tuple[type[np.unsignedinteger[Any]], type[np.signedinteger[Any]], torch.dtype]
] = {
    2: (np.uint16, np.int16, torch.int16),
    4: (np.uint32, np.int32, torch.int32),
}


def _keep_multiplier(keep: np.ndarray, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` where ``keep`` else 0, as a flat tensor of ``dtype``.

    For 2- and 4-byte floats the values are written as bit patterns by numpy (0 is all zero
    bits), which is several times faster than ``torch.where`` on a bool mask.
    """
    value = torch.tensor(scale, dtype=dtype)
    ints = _SAME_SIZE_INT.get(value.element_size())
    if ints is None or not dtype.is_floating_point:
        return torch.where(torch.from_numpy(keep), value, torch.zeros((), dtype=dtype))
    unsigned, signed, torch_int = ints
    pattern = unsigned(int(value.view(torch_int)) % 2 ** (8 * value.element_size()))
    bits = np.multiply(keep, pattern, dtype=unsigned).view(signed)
    return torch.from_numpy(bits).view(dtype)


class _FastSequential(nn.Sequential):
    """A Sequential whose dropout layers use `fast_dropout` when ``fast_kernels`` is on."""

    fast_kernels: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run_layers(self, x, self.fast_kernels)


# layers whose backward does not need their output, so that it may be overwritten
_OUTPUT_NOT_SAVED = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)


def _run_layers(layers: Iterable[nn.Module], x: torch.Tensor, fast: bool) -> torch.Tensor:
    fast = fast and x.device.type == "cpu"
    layers = list(layers)
    previous: nn.Module | None = None
    cancelled_bias: torch.Tensor | None = None
    skip = False
    for index, layer in enumerate(layers):
        following = layers[index + 1] if index + 1 < len(layers) else None
        fresh = isinstance(previous, _OUTPUT_NOT_SAVED)
        if skip:
            skip = False
        elif (
            fast
            and isinstance(layer, nn.LeakyReLU)
            and isinstance(following, nn.Dropout)
            and following.training
            and cpu_kernels.supports(x)
        ):
            x = cpu_kernels.leaky_dropout(x, layer.negative_slope, following.p, inplace=fresh)
            skip = True  # the dropout is done
        elif (
            fast
            and isinstance(layer, nn.BatchNorm2d)
            and layer.training
            and isinstance(following, nn.LeakyReLU)
            and cpu_kernels.supports_batch_norm(x)
        ):
            x = cpu_kernels.batch_norm_leaky(
                x, layer, following.negative_slope, mean_shift=cancelled_bias
            )
            skip = True  # the LeakyReLU is done
        elif fast and isinstance(layer, nn.BatchNorm2d) and layer.training:
            x = _batch_norm_with_batch_statistics(x, layer, mean_shift=cancelled_bias)
        elif fast and isinstance(layer, nn.LeakyReLU) and fresh:
            # in place on a fresh output nobody else keeps: one pass over memory less
            x = F.leaky_relu_(x, layer.negative_slope)
        elif fast and isinstance(layer, nn.Dropout) and layer.training:
            x = fast_dropout(x, layer.p)
        elif fast and isinstance(layer, nn.ConvTranspose2d) and _by_conv_grad(layer):
            cancels = layer.bias is not None and _uses_batch_statistics(following)
            x = conv_transpose_by_conv_grad(
                x, layer.weight, layer.bias, layer.stride, bias_cancelled=cancels
            )
            cancelled_bias = layer.bias if cancels else None
        elif fast and isinstance(layer, nn.ConvTranspose2d) and _by_phases(layer):
            x = conv_transpose_by_phases(x, layer.weight, layer.bias, layer.stride)
        elif fast and isinstance(layer, nn.Conv2d) and _small_output(layer, x):
            x = conv2d_small_output(x, layer.weight, layer.bias, layer.stride)
        else:
            x = layer(x)
        if not isinstance(layer, nn.ConvTranspose2d):
            cancelled_bias = None
        previous = layer
    return x


def _uses_batch_statistics(layer: nn.Module | None) -> bool:
    """Whether ``layer`` is a batch norm that normalises with the statistics of its batch.

    A constant per-channel bias added right before such a layer cancels out: the layer's output
    does not depend on it and its gradient is exactly zero. Only the running mean sees it.
    """
    return isinstance(layer, nn.BatchNorm2d) and (layer.training or layer.running_mean is None)


def _batch_norm_with_batch_statistics(
    x: torch.Tensor, norm: nn.BatchNorm2d, mean_shift: torch.Tensor | None
) -> torch.Tensor:
    """``norm(x)`` in training mode (where ``cpu_kernels.batch_norm_leaky`` does not apply),
    its running statistics updated through `domain_pass` like the fused kernel's."""
    y = F.batch_norm(x, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
    with torch.no_grad():
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=1)
    shifted = mean if mean_shift is None else mean + mean_shift.detach().float()
    domain_pass.update_running_statistics(norm, shifted, var)
    return y


def _by_conv_grad(layer: nn.ConvTranspose2d) -> bool:
    """Plain transposed convolutions with several output channels (measured faster)."""
    return (
        layer.out_channels > 1
        and layer.groups == 1
        and layer.padding == (0, 0)
        and layer.output_padding == (0, 0)
        and layer.dilation == (1, 1)
    )


def _by_phases(layer: nn.ConvTranspose2d) -> bool:
    """Plain transposed convolutions to one channel whose kernel is a multiple of the stride
    (the last 6 x 6, stride 2 layer)."""
    k_h, k_w = layer.kernel_size
    s_h, s_w = layer.stride
    return (
        layer.out_channels == 1
        and layer.groups == 1
        and layer.padding == (0, 0)
        and layer.output_padding == (0, 0)
        and layer.dilation == (1, 1)
        and k_h % s_h == 0
        and k_w % s_w == 0
    )


def _small_output(layer: nn.Conv2d, x: torch.Tensor) -> bool:
    """Plain convolutions whose output is no larger than their kernel (the 13 -> 5 px layer)."""
    plain = layer.padding == (0, 0) and layer.dilation == (1, 1) and layer.groups == 1
    k_h, k_w = layer.kernel_size
    s_h, s_w = layer.stride
    small = (x.shape[-2] - k_h) // s_h + 1 <= k_h and (x.shape[-1] - k_w) // s_w + 1 <= k_w
    return plain and layer.padding_mode == "zeros" and small


def _conv_backward(
    grad_out: torch.Tensor,
    inputs: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    data: bool,
) -> torch.Tensor:
    """Input (``data``) or weight gradient of ``conv2d(inputs, weight, stride=stride)``; for the
    input gradient only the shape and layout of ``inputs`` matter."""
    mask = [data, not data, False]
    grads = torch.ops.aten.convolution_backward(
        grad_out, inputs, weight, None, stride, [0, 0], [1, 1], False, [0, 0], 1, mask
    )
    return grads[0] if data else grads[1]


def _conv_weight_grad(
    inputs: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, stride: list[int]
) -> torch.Tensor:
    """The weight gradient of ``conv2d(inputs, weight, stride=stride)`` (no padding).

    For outputs no larger than the kernel, im2col of the input (about 2.5x its size) and one
    matrix product are about 3x faster than oneDNN's weight-gradient kernel for that shape.
    """
    k_h, k_w = weight.shape[2:]
    if grad_out.shape[-2] > k_h or grad_out.shape[-1] > k_w:
        return _conv_backward(grad_out, inputs, weight, stride, data=False)
    patches = inputs.permute(0, 2, 3, 1).unfold(1, k_h, stride[0]).unfold(2, k_w, stride[1])
    # (N * H_out * W_out, k k C): channels innermost makes the gather twice as fast as (C k k)
    columns = patches.permute(0, 1, 2, 4, 5, 3).reshape(-1, k_h * k_w * inputs.shape[1])
    rows = grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])
    c_out, c_in = weight.shape[:2]
    return (rows.t() @ columns).view(c_out, k_h, k_w, c_in).permute(0, 3, 1, 2)


def _as_autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on for its device (as convolutions do)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def conv2d_small_output(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...]
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride)`` (no padding) with a faster weight gradient for
    outputs no larger than the kernel. Follows autocast like ``F.conv2d``."""
    return _Conv2dSmallOutput.apply(_as_autocast_input(x), weight, bias, list(stride))


class _Conv2dSmallOutput(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: list[int],
    ) -> torch.Tensor:
        w = weight.to(x.dtype)
        out = F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride=stride)
        ctx.save_for_backward(x, w)
        ctx.stride = stride
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, w = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_backward(grad, x, w, ctx.stride, data=True)
        if ctx.needs_input_grad[1]:
            grad_w = _conv_weight_grad(x, grad, w, ctx.stride).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3)).to(ctx.weight_dtype)
        return grad_x, grad_w, grad_b, None


def conv_transpose_by_conv_grad(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    bias_cancelled: bool = False,
) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride)`` (no padding) via convolution kernels.

    A transposed convolution is the input gradient of a convolution; oneDNN computes that with
    its fast convolution kernels, while its transposed-convolution forward kernel is slower.
    ``bias_cancelled``: a batch norm with batch statistics follows, which removes any constant
    per-channel bias, so the bias is not added and its gradient is zero (two passes over the
    output saved). Follows autocast like ``F.conv_transpose2d``.
    """
    return _ConvTransposeByConvGrad.apply(
        _as_autocast_input(x), weight, bias, list(stride), bias_cancelled
    )


class _ConvTransposeByConvGrad(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: list[int],
        bias_cancelled: bool,
    ) -> torch.Tensor:
        w = weight.to(x.dtype)
        n, _, height, width = x.shape
        k_h, k_w = w.shape[2:]
        out_shape = (n, w.shape[1], (height - 1) * stride[0] + k_h, (width - 1) * stride[1] + k_w)
        layout = cpu_kernels.memory_format(x)
        shape_only = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=layout)
        out = _conv_backward(x, shape_only, w, stride, data=True)
        if bias is not None and not bias_cancelled:
            out.add_(bias.to(x.dtype).view(1, -1, 1, 1))
        ctx.save_for_backward(x, w)
        ctx.stride = stride
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        ctx.bias_cancelled = bias_cancelled
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        x, w = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, w, stride=ctx.stride)
        if ctx.needs_input_grad[1]:  # the conv whose input gradient this layer computes
            grad_w = _conv_weight_grad(grad, x, w, ctx.stride).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            if ctx.bias_cancelled:  # what the sum below gives in exact arithmetic
                grad_b = torch.zeros(w.shape[1], dtype=ctx.weight_dtype, device=grad.device)
            else:
                grad_b = grad.sum((0, 2, 3)).to(ctx.weight_dtype)  # accumulates in fp32
        return grad_x, grad_w, grad_b, None, None


def conv_transpose_by_phases(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...]
) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride)`` (no padding, kernel a multiple of the
    stride) as one matrix product and shifted additions.

    With kernel ``k = m * s``, output pixel ``(s * I + a, s * J + b)`` only receives the taps
    ``(s * p + a, s * q + b)`` from input pixel ``(I - p, J - q)``: the product of every input
    pixel with every tap, then ``m * m`` shifted additions per output phase ``(a, b)``. oneDNN's
    kernels for a transposed convolution to one channel run at a tenth of its usual speed; this
    makes the layer about twice as fast. Sums are taken in fp32. Follows autocast like
    ``F.conv_transpose2d``.
    """
    return _ConvTransposeByPhases.apply(_as_autocast_input(x), weight, bias, list(stride))


def _pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N * H * W, C); no copy for channels_last tensors."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class _ConvTransposeByPhases(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: list[int],
    ) -> torch.Tensor:
        n, c_in, height, width = x.shape
        c_out, (k_h, k_w), (s_h, s_w) = weight.shape[1], weight.shape[2:], stride
        m_h, m_w = k_h // s_h, k_w // s_w
        taps = weight.to(x.dtype).reshape(c_in, -1).t()  # (c_out * k_h * k_w, c_in)
        # every pixel times every tap, laid out (c_out, p, a, q, b, n, i, j), kernel row s*p + a
        products = (taps @ _pixel_rows(x).t()).view(c_out, m_h, s_h, m_w, s_w, n, height, width)
        phases = torch.zeros(
            (c_out, s_h, s_w, n, height + m_h - 1, width + m_w - 1),
            dtype=torch.promote_types(x.dtype, torch.float32),
            device=x.device,
        )
        if bias is not None:
            phases += bias.to(phases.dtype).view(-1, 1, 1, 1, 1, 1)
        for p in range(m_h):
            for q in range(m_w):
                phases[:, :, :, :, p : p + height, q : q + width] += products[:, p, :, q]
        # phases (c_out, a, b, n, I, J) -> image (n, c_out, s * I + a, s * J + b)
        out = phases.permute(3, 0, 4, 1, 5, 2).reshape(
            n, c_out, s_h * (height + m_h - 1), s_w * (width + m_w - 1)
        )
        ctx.save_for_backward(x, taps)
        ctx.geometry = (m_h, m_w, s_h, s_w)
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return out.to(x.dtype)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, taps = ctx.saved_tensors
        m_h, m_w, s_h, s_w = ctx.geometry
        n, c_in, height, width = x.shape
        c_out = grad.shape[1]
        # the image gradient as phases (c_out, a, b, n, I, J), then gathered per tap (the
        # transpose of the shifted additions)
        grad_phases = (
            grad.to(x.dtype)
            .reshape(n, c_out, height + m_h - 1, s_h, width + m_w - 1, s_w)
            .permute(1, 3, 5, 0, 2, 4)
        )
        grad_products = torch.empty(
            c_out, m_h, s_h, m_w, s_w, n, height, width, dtype=x.dtype, device=x.device
        )
        for p in range(m_h):
            for q in range(m_w):
                grad_products[:, p, :, q] = grad_phases[..., p : p + height, q : q + width]
        grad_products = grad_products.view(taps.shape[0], -1)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # (n * h * w, c_in): channels_last
            grad_rows = grad_products.t() @ taps
            grad_x = grad_rows.view(n, height, width, c_in).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_taps = grad_products @ _pixel_rows(x)  # (c_out * k_h * k_w, c_in)
            grad_w = grad_taps.t().reshape(c_in, c_out, m_h * s_h, m_w * s_w)
            grad_w = grad_w.to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            wide = torch.promote_types(grad.dtype, torch.float32)
            grad_b = grad.sum((0, 2, 3), dtype=wide).to(ctx.weight_dtype)
        return grad_x, grad_w, grad_b, None


class OuterEncoder(_FastSequential):
    """Domain-specific outer encoder: (N, 1, 128, 128) -> (N, 8c, 5, 5)."""

    def __init__(self, cfg: ModelConfig) -> None:
        c = cfg.base_channels
        super().__init__(
            *_conv_block(1, c, cfg),
            *_conv_block(c, 2 * c, cfg),
            *_conv_block(2 * c, 4 * c, cfg),
            *_conv_block(4 * c, 8 * c, cfg),
        )
        self.standardize_input = cfg.standardize_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(standardize_images(x) if self.standardize_input else x)


def standardize_images(images: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Each image (N, C, H, W) at zero mean and unit variance; ``eps`` keeps flat images finite.

    Written with plain reductions so that it exports to ONNX as it is.
    """
    centred = images - images.mean(dim=(1, 2, 3), keepdim=True)
    variance = centred.square().mean(dim=(1, 2, 3), keepdim=True)
    return centred * torch.rsqrt(variance + eps)


def _flat_pixels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W*C) for channels_last tensors (no copy), else (N, C*H*W)."""
    return x.permute(0, 2, 3, 1).flatten(1) if cpu_kernels.is_channels_last(x) else x.flatten(1)


class SharedEncoder(nn.Module):
    """Shared inner encoder: (N, 8c, 5, 5) -> mu, logvar of shape (N, latent)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.base_channels
        self.conv = _FastSequential(*_conv_block(8 * c, 16 * c, cfg), nn.Flatten())
        self.fc_mu = nn.Linear(16 * c, cfg.latent_dim)
        self.fc_logvar = nn.Linear(16 * c, cfg.latent_dim)
        self.fast_kernels = False

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv = self.conv[0]
        assert isinstance(conv, nn.Conv2d)
        if self.fast_kernels and tuple(features.shape[-2:]) == conv.kernel_size:
            # a k x k convolution of a k x k input is one matrix product (oneDNN's kernels for
            # this shape, and their weight gradients, are several times slower)
            weight = conv.weight
            if cpu_kernels.is_channels_last(features):
                weight = weight.permute(0, 2, 3, 1)
            hidden = F.linear(_flat_pixels(features), weight.flatten(1), conv.bias)
            hidden = _run_layers(list(self.conv)[1:], hidden, fast=True)  # Flatten: a no-op
        else:
            hidden = self.conv(features)
        return self.fc_mu(hidden), self.fc_logvar(hidden)


class SharedDecoder(nn.Module):
    """Shared inner decoder: (N, latent) -> (N, 8c, 5, 5)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.base_channels
        self.fc = nn.Linear(cfg.latent_dim, 16 * c)
        self.deconv = nn.Sequential(*_deconv_block(16 * c, 8 * c, 5, 2, cfg))
        self._channels = 16 * c
        self.fast_kernels = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(z)
        if not self.fast_kernels:
            return self.deconv(hidden.view(-1, self._channels, 1, 1))
        # the transposed convolution of a 1 x 1 input is one matrix product
        deconv = self.deconv[0]
        assert isinstance(deconv, nn.ConvTranspose2d)
        weight = deconv.weight  # (in, out, k, k)
        n, (k_h, k_w), c_out = hidden.shape[0], deconv.kernel_size, weight.shape[1]
        if cpu_kernels.is_channels_last(weight):
            out = torch.matmul(hidden, weight.permute(0, 2, 3, 1).flatten(1))
            out = out.view(n, k_h, k_w, c_out)
            if deconv.bias is not None:
                out = out + deconv.bias.to(out.dtype)  # keeps the autocast dtype
            out = out.permute(0, 3, 1, 2)
        else:
            out = torch.matmul(hidden, weight.flatten(1)).view(n, c_out, k_h, k_w)
            if deconv.bias is not None:
                out = out + deconv.bias.to(out.dtype).view(-1, 1, 1)
        return _run_layers(list(self.deconv)[1:], out, fast=True)


class OuterDecoder(_FastSequential):
    """Domain-specific outer decoder: (N, 8c, 5, 5) -> (N, 1, 128, 128) in [0, 1]."""

    def __init__(self, cfg: ModelConfig) -> None:
        c = cfg.base_channels
        super().__init__(
            *_deconv_block(8 * c, 4 * c, 5, 2, cfg),  # 5 -> 13
            *_deconv_block(4 * c, 2 * c, 5, 2, cfg),  # 13 -> 29
            *_deconv_block(2 * c, c, 5, 2, cfg),  # 29 -> 61
            *_deconv_block(c, c, 2, 1, cfg),  # 61 -> 62
            nn.ConvTranspose2d(c, 1, kernel_size=6, stride=2),  # 62 -> 128
            nn.Sigmoid(),
        )


class Regressor(_FastSequential):
    """MLP from features to a raw (unbounded, linear) cell count."""

    def __init__(self, in_features: int, cfg: ModelConfig) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for hidden in cfg.regressor_hidden:
            layers += [
                nn.Linear(width, hidden),
                nn.LeakyReLU(cfg.leaky_slope),
                nn.Dropout(cfg.dropout),
            ]
            width = hidden
        layers.append(nn.Linear(width, 1))
        super().__init__(*layers)

    @torch.no_grad()
    def start_at(self, count: float) -> None:
        """Set the output bias so that an untrained regressor predicts about ``count``.

        With the default init the first predictions are near 0, and the first hundreds of steps
        only move the mean; starting at the mean label skips that.
        """
        last = self[-1]
        assert isinstance(last, nn.Linear)
        last.bias.fill_(count)


@dataclass
class TwinOutput:
    """Everything one forward pass of one domain produces (recon is None when not decoded)."""

    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    count: torch.Tensor
    recon: torch.Tensor | None


class TwinVAE(nn.Module):
    """Two VAEs with domain-specific outer layers and shared inner layers and regressor.

    Parameter groups (used by the transfer strategies): ``outer`` = encoders + decoders,
    ``core`` = shared encoder + shared decoder, ``regressor``.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        cfg = self.config
        self.encoders = nn.ModuleDict({d: OuterEncoder(cfg) for d in DOMAINS})
        self.shared_encoder = SharedEncoder(cfg)
        self.shared_decoder = SharedDecoder(cfg)
        self.decoders = nn.ModuleDict({d: OuterDecoder(cfg) for d in DOMAINS})
        regressor_in = (
            cfg.latent_dim if cfg.regressor_input == "latent" else 8 * cfg.base_channels * 25
        )
        self.regressor = Regressor(regressor_in, cfg)
        if cfg.init == "orthogonal":
            self.apply(_orthogonal_init)

    @property
    def fast_kernels(self) -> bool:
        """Faster training kernels (see the module docstring); off = the reference layers."""
        return self.shared_encoder.fast_kernels

    @fast_kernels.setter
    def fast_kernels(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, _FastSequential | SharedEncoder | SharedDecoder):
                module.fast_kernels = enabled

    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        """Modules by transfer group: outer, outer_natural, outer_synthetic, core, regressor."""
        return {
            "outer_natural": [self.encoders["natural"], self.decoders["natural"]],
            "outer_synthetic": [self.encoders["synthetic"], self.decoders["synthetic"]],
            "outer": [*self.encoders.values(), *self.decoders.values()],
            "core": [self.shared_encoder, self.shared_decoder],
            "regressor": [self.regressor],
        }

    def encode(self, images: torch.Tensor, domain: DomainName) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 1, 128, 128) in [0, 1] -> mu, logvar (N, latent)."""
        return self.shared_encoder(self.encoders[domain](images))

    def decode(self, z: torch.Tensor, domain: DomainName) -> torch.Tensor:
        """Latent codes (N, latent) -> images (N, 1, 128, 128) of the given domain."""
        return self.decoders[domain](self.shared_decoder(z))

    def regress(self, mu: torch.Tensor) -> torch.Tensor:
        """Latent mean (N, latent) -> counts (N,)."""
        features = (
            mu if self.config.regressor_input == "latent" else self.shared_decoder(mu).flatten(1)
        )
        return self.regressor(features).squeeze(1)

    def forward(
        self, images: torch.Tensor, domain: DomainName, *, sample: bool = True, decode: bool = True
    ) -> TwinOutput:
        """One domain's pass. ``sample`` draws z (training); otherwise z = mu (deterministic)."""
        mu, logvar = self.encode(images, domain)
        if sample:
            noise = torch.randn(
                mu.shape, dtype=mu.dtype, device=mu.device, generator=domain_pass.generator()
            )
            z = mu + noise * torch.exp(0.5 * logvar)
        else:
            z = mu
        recon = self.decode(z, domain) if decode else None
        return TwinOutput(mu=mu, logvar=logvar, z=z, count=self.regress(mu), recon=recon)

    @torch.no_grad()
    def count(self, images: torch.Tensor, domain: DomainName = "natural") -> torch.Tensor:
        """Deterministic counts (N,) for images (N, 1, 128, 128) in [0, 1]; uses mu."""
        return self.regress(self.encode(images, domain)[0])

    @torch.no_grad()
    def translate(
        self, images: torch.Tensor, source: DomainName, target: DomainName
    ) -> torch.Tensor:
        """Encode in ``source`` and decode as ``target`` (e.g. natural -> synthetic look)."""
        return self.decode(self.encode(images, source)[0], target)

    def counting_network(
        self, domain: DomainName = "natural", with_mu: bool = False
    ) -> CountingNetwork:
        """The deterministic encoder + regressor path of one domain, for export."""
        return CountingNetwork(self, domain, with_mu)


class CountingNetwork(nn.Module):
    """Outer encoder -> shared encoder -> mu -> regressor; (N, 1, 128, 128) -> (N, 1) counts.

    Shares (does not copy) the Twin-VAE's modules. With ``with_mu`` it also returns mu (N, latent).
    """

    def __init__(
        self, twin: TwinVAE, domain: DomainName = "natural", with_mu: bool = False
    ) -> None:
        super().__init__()
        self.encoder = twin.encoders[domain]
        self.shared_encoder = twin.shared_encoder
        self.regressor = twin.regressor
        self.shared_decoder = (
            twin.shared_decoder if twin.config.regressor_input != "latent" else None
        )
        self.with_mu = with_mu

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        mu, _ = self.shared_encoder(self.encoder(images))
        features = mu if self.shared_decoder is None else self.shared_decoder(mu).flatten(1)
        count = self.regressor(features)
        return (count, mu) if self.with_mu else count


def _orthogonal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.orthogonal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def set_trainable(modules: list[nn.Module], trainable: bool) -> None:
    """Freeze or unfreeze modules; frozen modules also stay in eval mode (BatchNorm, dropout)."""
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(trainable)
