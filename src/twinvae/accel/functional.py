"""Faster formulations of some layers for CPU training: the same functions, other kernels.

- `fast_dropout`: inverted dropout with a mask from numpy's SFC64 generator (where the fused C
  kernel does not apply).
- `conv2d_small_output`: a convolution whose output is no larger than its kernel, with its
  weight gradient as im2col + one matrix product.
- `conv_transpose_by_conv_grad`: a transposed convolution as the input gradient of a
  convolution (oneDNN's kernels for that are about twice as fast), optionally without the
  bias that a following batch norm cancels.
- `conv_transpose_by_phases`: a transposed convolution to one channel as one matrix product
  and shifted additions.
- `batch_norm_with_batch_statistics`: batch norm in training mode whose running statistics go
  through `passes`.

Random draws come from the current independent pass's generator (`passes.generator`), else
from torch's global one. Measurements: benchmarks/README.md, "Training throughput".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twinvae.accel import cpu_kernels, passes

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
    seed = int(torch.randint(0, 2**62, (1,), generator=passes.generator()))
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


def batch_norm_with_batch_statistics(
    x: torch.Tensor, norm: nn.BatchNorm2d, mean_shift: torch.Tensor | None
) -> torch.Tensor:
    """``norm(x)`` in training mode (where ``cpu_kernels.batch_norm_leaky`` does not apply),
    its running statistics updated through `passes` like the fused kernel's, of
    ``x + mean_shift`` when given."""
    y = F.batch_norm(x, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
    with torch.no_grad():
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=1)
    shifted = mean if mean_shift is None else mean + mean_shift.detach().float()
    passes.update_running_statistics(norm, shifted, var)
    return y


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
