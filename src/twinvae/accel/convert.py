"""`accelerate`: swap a Twin-VAE's layers for the faster ones of `modules`, once, in place."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from twinvae.accel import cpu_kernels
from twinvae.accel.modules import (
    BatchNormLeakyReLU,
    Conv2dAsLinear,
    ConvTranspose2dByConvGrad,
    ConvTranspose2dByPhases,
    FusedLeakyReLU,
    LeakyReLUDropout,
    PassDropout,
    PassGaussianSample,
    PixelConvTranspose2d,
    SmallOutputConv2d,
)
from twinvae.models.counting_network import SharedDecoder, SharedEncoder
from twinvae.models.twin_vae import GaussianSample

Module = TypeVar("Module", bound=nn.Module)

# exact types whose backward does not read their output: the next layer may overwrite it
_FRESH_OUTPUT = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)


class NotAcceleratedError(RuntimeError):
    """A model has layers that would race between threads (see `require_independent_passes`)."""


def accelerate(model: Module, device: torch.device | str = "cpu") -> Module:
    """Make ``model`` (a `TwinVAE`, or any module built from its blocks) train faster on
    ``device``; returns it, changed in place.

    Layers become instances of their subclasses in `modules` (the same parameter and buffer
    objects, so state-dict keys, optimisers holding them and modules sharing them are
    unaffected) that compute the same function up to float rounding, with other random
    dropout masks. On every device the two 1-pixel shared layers become matrix products. On
    the CPU also: LeakyReLU + dropout and batch norm + LeakyReLU fused (C kernels where they
    are built), transposed convolutions by convolution kernels (without a bias that the next
    batch norm cancels), the 13 -> 5 px convolution's weight gradient by im2col, and every
    random draw and batch-norm update through `passes`, which makes the model safe for
    independent passes on threads. Calling it again changes nothing.
    """
    modules = list(model.modules())
    for module in modules:
        if isinstance(module, SharedEncoder):
            _become(module.conv[0], Conv2dAsLinear, nn.Conv2d)
        elif isinstance(module, SharedDecoder):
            _become(module.deconv[0], PixelConvTranspose2d, nn.ConvTranspose2d)
    if torch.device(device).type == "cpu":
        for module in modules:
            if isinstance(module, nn.Sequential):
                _accelerate_layers(module)
            elif type(module) is GaussianSample:
                _become(module, PassGaussianSample, GaussianSample)
    return model


def _become(module: nn.Module, subclass: type[Module], plain: type[nn.Module]) -> Module:
    """``module`` turned into an instance of ``subclass`` (of its own class ``plain``) in
    place: the same object, parameters and buffers, the subclass's forward. Modules already
    changed are left as they are."""
    if type(module) is plain:
        module.__class__ = subclass
    assert isinstance(module, subclass), f"{type(module).__name__} is not a {subclass.__name__}"
    return module


def _accelerate_layers(layers: nn.Sequential) -> None:
    """The CPU forms of one sequence of layers (pairs fused where the first is followed by the
    second); layers that have none, or are already accelerated, stay."""
    modules = list(layers)
    kinds: list[type[nn.Module] | None] = [type(layer) for layer in modules]
    kinds.append(None)
    fused: set[int] = set()
    for index, layer in enumerate(modules):
        before = kinds[index - 1] if index else None
        kind, after = kinds[index], kinds[index + 1]
        if index in fused:
            continue
        if kind is nn.LeakyReLU and after is nn.Dropout:
            dropout = _become(modules[index + 1], LeakyReLUDropout, nn.Dropout)
            dropout.leaky_slope = _slope(layer)
            dropout.overwrite_input = before in _FRESH_OUTPUT
            layers[index] = FusedLeakyReLU(_slope(layer), by="next")
            fused.add(index + 1)
        elif kind is nn.Dropout:
            _become(layer, PassDropout, nn.Dropout)
        elif kind is nn.BatchNorm2d:
            norm = _become(layer, BatchNormLeakyReLU, nn.BatchNorm2d)
            previous = modules[index - 1] if index else None
            if isinstance(previous, ConvTranspose2dByConvGrad):
                norm.bias_from, previous.cancelled_by = (previous,), (norm,)
            if after is nn.LeakyReLU:
                norm.leaky_slope = _slope(modules[index + 1])
                layers[index + 1] = FusedLeakyReLU(norm.leaky_slope, by="previous")
                fused.add(index + 1)
        elif kind is nn.ConvTranspose2d:
            assert isinstance(layer, nn.ConvTranspose2d)
            if _plain_transposed(layer) and layer.out_channels > 1:
                _become(layer, ConvTranspose2dByConvGrad, nn.ConvTranspose2d)
            elif _plain_transposed(layer) and _kernel_multiple_of_stride(layer):
                _become(layer, ConvTranspose2dByPhases, nn.ConvTranspose2d)
        elif kind is nn.Conv2d:
            _become(layer, SmallOutputConv2d, nn.Conv2d)


def _slope(layer: nn.Module) -> float:
    assert isinstance(layer, nn.LeakyReLU)
    return float(layer.negative_slope)


def _plain_transposed(layer: nn.ConvTranspose2d) -> bool:
    return (
        layer.groups == 1
        and layer.padding == (0, 0)
        and layer.output_padding == (0, 0)
        and layer.dilation == (1, 1)
    )


def _kernel_multiple_of_stride(layer: nn.ConvTranspose2d) -> bool:
    """To one channel, kernel a multiple of the stride (the last 6 x 6, stride 2 layer)."""
    (k_h, k_w), (s_h, s_w) = layer.kernel_size, layer.stride
    return layer.out_channels == 1 and k_h % s_h == 0 and k_w % s_w == 0


def uses_cpu_kernels(model: nn.Module) -> bool:
    """Whether ``model`` is accelerated for the CPU and its fused C kernels are built (they
    draw other dropout masks than `functional`'s fallback)."""
    fused = (LeakyReLUDropout, BatchNormLeakyReLU)
    return any(isinstance(m, fused) for m in model.modules()) and cpu_kernels.available()


def thread_unsafe_layers(model: nn.Module) -> list[str]:
    """Names of the layers that draw from torch's global generator or update batch-norm
    statistics at once: they would race when two passes run on threads."""
    plain = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, GaussianSample)
    safe: tuple[type[Any], ...] = (PassDropout, BatchNormLeakyReLU, PassGaussianSample)
    return [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, plain) and not isinstance(module, safe)
    ]


def require_independent_passes(model: nn.Module) -> None:
    """Raise `NotAcceleratedError` unless every random draw and batch-norm update of
    ``model`` goes through `passes`, as two passes on two threads need."""
    unsafe = thread_unsafe_layers(model)
    if unsafe:
        first_of_each_kind: dict[str, str] = {}
        for name in unsafe:
            first_of_each_kind.setdefault(name.rsplit(" ", 1)[1], name)
        raise NotAcceleratedError(
            f"the model's passes cannot run on threads: {len(unsafe)} layers would race "
            "(they draw from torch's global generator or update batch-norm statistics at "
            f"once), e.g. {', '.join(first_of_each_kind.values())}. Call "
            "twinvae.accel.accelerate(model, 'cpu') first, or run the passes one after the other."
        )
