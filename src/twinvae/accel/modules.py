"""The modules `accelerate` swaps in: subclasses of the layers they replace, with the same
parameters and buffers (so state-dict keys stay) and the same function, computed faster.

On the CPU they use `functional` and the fused C kernels of `cpu_kernels`, draw random numbers
from the current independent pass (`passes`) and defer batch-norm running statistics there.
On other devices (a model moved after `accelerate`), each one computes as the layer it replaces,
except the two 1-pixel shared layers, whose matrix products suit every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twinvae.accel import cpu_kernels, passes
from twinvae.accel.functional import (
    batch_norm_with_batch_statistics,
    conv2d_small_output,
    conv_transpose_by_conv_grad,
    conv_transpose_by_phases,
    fast_dropout,
)
from twinvae.models.twin_vae import GaussianSample


def _on_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


class FusedLeakyReLU(nn.Identity):
    """The place of a LeakyReLU that a neighbouring module computes (``by``: previous, next)."""

    def __init__(self, negative_slope: float, by: str) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.by = by

    def extra_repr(self) -> str:
        return f"LeakyReLU(negative_slope={self.negative_slope}) computed by the {self.by} module"


class PassDropout(nn.Dropout):
    """Dropout whose CPU masks come from `fast_dropout`, seeded by the current pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not _on_cpu(x):
            return super().forward(x)
        return fast_dropout(x, self.p)


class LeakyReLUDropout(PassDropout):
    """LeakyReLU, then dropout (training): on the CPU one pass of the fused C kernel.

    ``overwrite_input``: the input is the fresh output of a layer whose backward does not read
    it (a convolution), so the activation may overwrite it: one pass over memory less.
    """

    leaky_slope: float = 0.01
    overwrite_input: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu = _on_cpu(x)
        if self.training and cpu and cpu_kernels.supports(x):
            return cpu_kernels.leaky_dropout(x, self.leaky_slope, self.p, self.overwrite_input)
        x = F.leaky_relu(x, self.leaky_slope, inplace=cpu and self.overwrite_input)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"leaky_slope={self.leaky_slope}, p={self.p}, overwrite_input={self.overwrite_input}"


def uses_batch_statistics(norm: nn.BatchNorm2d) -> bool:
    """Whether ``norm`` normalises with the statistics of its batch.

    A constant per-channel bias added right before such a layer cancels out: the layer's output
    does not depend on it and its gradient is exactly zero. Only the running mean sees it.
    """
    return norm.training or norm.running_mean is None


class BatchNormLeakyReLU(nn.BatchNorm2d):
    """Batch norm, then LeakyReLU when ``leaky_slope`` is set; in training on the CPU with
    batch statistics as one fused C kernel (channels-last inputs) or `functional`, the running
    statistics deferred in an independent pass. When the transposed convolution before it
    skipped its bias (``bias_from``, a `ConvTranspose2dByConvGrad`), the running mean gets it.
    """

    leaky_slope: float | None = None
    # plain attributes in a tuple: not submodules, so no state-dict keys or double traversal
    bias_from: tuple[nn.ConvTranspose2d, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu = _on_cpu(x)
        if self.training and cpu:
            shift = self.bias_from[0].bias if self.bias_from else None
            if self.leaky_slope is not None and cpu_kernels.supports_batch_norm(x):
                return cpu_kernels.batch_norm_leaky(x, self, self.leaky_slope, mean_shift=shift)
            y = batch_norm_with_batch_statistics(x, self, mean_shift=shift)
        else:
            y = super().forward(x)
        if self.leaky_slope is None:
            return y
        return F.leaky_relu(y, self.leaky_slope, inplace=cpu)  # y is fresh: batch norm's own

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, leaky_slope={self.leaky_slope}"


class ConvTranspose2dByConvGrad(nn.ConvTranspose2d):
    """On the CPU `conv_transpose_by_conv_grad`: the input gradient of a convolution. Its bias
    is left out while the next batch norm (``cancelled_by``) uses batch statistics."""

    cancelled_by: tuple[nn.BatchNorm2d, ...] = ()

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not _on_cpu(x) or output_size is not None:
            return super().forward(x, output_size)
        cancels = self.bias is not None and any(uses_batch_statistics(n) for n in self.cancelled_by)
        return conv_transpose_by_conv_grad(
            x, self.weight, self.bias, self.stride, bias_cancelled=cancels
        )


class ConvTranspose2dByPhases(nn.ConvTranspose2d):
    """On the CPU `conv_transpose_by_phases` (to one channel, kernel a multiple of the stride)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not _on_cpu(x) or output_size is not None:
            return super().forward(x, output_size)
        return conv_transpose_by_phases(x, self.weight, self.bias, self.stride)


class PixelConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution of a 1 x 1 input as one matrix product (the shared decoder's:
    oneDNN's kernels for this shape, and their weight gradients, are several times slower)."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (1, 1) or output_size is not None:
            return super().forward(x, output_size)
        hidden = x.flatten(1)
        weight = self.weight  # (in, out, k, k)
        n, (k_h, k_w), c_out = hidden.shape[0], self.kernel_size, weight.shape[1]
        if cpu_kernels.is_channels_last(weight):
            out = torch.matmul(hidden, weight.permute(0, 2, 3, 1).flatten(1))
            out = out.view(n, k_h, k_w, c_out)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)  # keeps the autocast dtype
            return out.permute(0, 3, 1, 2)
        out = torch.matmul(hidden, weight.flatten(1)).view(n, c_out, k_h, k_w)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).view(-1, 1, 1)
        return out


def _small_output(layer: nn.Conv2d, x: torch.Tensor) -> bool:
    """Plain convolutions whose output is no larger than their kernel (the 13 -> 5 px layer)."""
    plain = layer.padding == (0, 0) and layer.dilation == (1, 1) and layer.groups == 1
    k_h, k_w = layer.kernel_size
    s_h, s_w = layer.stride
    small = (x.shape[-2] - k_h) // s_h + 1 <= k_h and (x.shape[-1] - k_w) // s_w + 1 <= k_w
    return plain and layer.padding_mode == "zeros" and small


class SmallOutputConv2d(nn.Conv2d):
    """On the CPU, for outputs no larger than the kernel, `conv2d_small_output`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _on_cpu(x) and _small_output(self, x):
            return conv2d_small_output(x, self.weight, self.bias, self.stride)
        return super().forward(x)


def _flat_pixels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W*C) for channels_last tensors (no copy), else (N, C*H*W)."""
    return x.permute(0, 2, 3, 1).flatten(1) if cpu_kernels.is_channels_last(x) else x.flatten(1)


class Conv2dAsLinear(SmallOutputConv2d):
    """A k x k convolution of a k x k input as one matrix product (the shared encoder's: 5 ->
    1 px; oneDNN's kernels for this shape, and their weight gradients, are several times
    slower). Output (N, C, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.kernel_size:
            return super().forward(x)
        weight = self.weight
        if cpu_kernels.is_channels_last(x):
            weight = weight.permute(0, 2, 3, 1)
        hidden = F.linear(_flat_pixels(x), weight.flatten(1), self.bias)
        return hidden.view(hidden.shape[0], -1, 1, 1)


class PassGaussianSample(GaussianSample):
    """eps from the generator of the current independent pass (else torch's global one)."""

    def generator(self) -> torch.Generator | None:
        return passes.generator()
