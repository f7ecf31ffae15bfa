"""Fused element-wise CPU kernels for training: C code compiled on first use, run as torch ops.

PyTorch runs LeakyReLU, dropout and batch norm as separate passes over memory (and draws
dropout masks with a slow per-element generator); at the 61 and 62 px layers these passes cost
more than some convolutions. Fused operations, forward and backward:

- ``leaky_dropout``: LeakyReLU + inverted dropout in one pass. The mask is never stored: it is
  a hash of the element index and a seed drawn from torch's RNG (``torch.manual_seed`` makes
  runs reproducible; inside a `passes.independent_pass`, from the pass's generator), which the
  backward pass recomputes.
- ``batch_norm_leaky``: batch norm with batch statistics + LeakyReLU in two passes (statistics,
  then output), backward in two; statistics are summed in double.
- ``add_noise``: the augmentation's clamped Gaussian noise in one pass.

Every C function is registered as a torch operator (``torch.ops.twinvae.leaky_dropout`` and so
on: a schema that states what it mutates, a CPU kernel and a fake kernel for tracing); the
autograd functions below put them together. Results do not depend on the number of threads.
The kernels use OpenMP on torch's threads (built with ``-fopenmp`` against the ``libgomp``
torch loaded; without OpenMP on one thread).

The C source is compiled with the system C compiler (``$CC``, else ``cc``) and ``-march=native``
into a cache folder (``$TWINVAE_CACHE``, else ``$XDG_CACHE_HOME/twinvae``, else
``~/.cache/twinvae``), in a sub-folder named by a hash of everything the binary depends on: the
source, the compile flags, the compiler and its version, the CPU's feature flags and the target
macros ``-march=native`` defines on this CPU. A cache shared by machines with other CPUs (a
network home folder) therefore never gives one of them a binary built for another. Without a
compiler, or with ``TWINVAE_CPU_KERNELS=0``, ``available()`` is False and callers use PyTorch's
ops (same function up to rounding, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from twinvae.accel import passes

SOURCE = Path(__file__).with_name("cpu_kernels.c")
COMPILE_FLAGS = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC")
_P, _I, _U, _F, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int
_SIGNATURES = {  # name (without dtype suffix) -> argument types; the last is the thread count
    "leaky_dropout_forward": [_P, _P, _I, _I, _U, _U, _U, _F, _F, _T],
    "leaky_dropout_backward": [_P, _P, _P, _I, _I, _U, _U, _U, _F, _F, _T],
    "bn_stats": [_P, _P, _P, _I, _I, _I, _I, _I, _T],
    "bn_leaky_forward": [_P, _P, _P, _P, _I, _I, _I, _F, _T],
    "bn_leaky_backward_stats": [*[_P] * 8, *[_I] * 5, _F, _T],
    "bn_leaky_backward": [*[_P] * 10, *[_I] * 3, _F, _T],
}
_SINGLE = {"add_noise_f32": [_P, _P, _P, _P, _I, _I, _I, _U, _U, _T]}  # no dtype variants
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
# batch-norm statistics are summed per chunk of this many rows (pixels), then over chunks
_CHUNK_ROWS = 1024

_library: ctypes.CDLL | None = None
_loaded = False
_load_lock = threading.Lock()


# ---- building and loading ----------------------------------------------------------------------


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("TWINVAE_CACHE"):
        return Path(os.environ["TWINVAE_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "twinvae" / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags from /proc/cpuinfo (sorted; "" where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ""
    flags: set[str] = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):  # x86, ARM
            flags.update(line.partition(":")[2].split())
    return " ".join(sorted(flags))


def _compiler_output(compiler: str, *arguments: str) -> str:
    """What ``compiler arguments`` prints ("" when it fails)."""
    try:
        result = subprocess.run(
            [compiler, *arguments], capture_output=True, text=True, check=False, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def build_fingerprint(compiler: str) -> dict[str, str]:
    """Everything the compiled binary depends on; its hash names the cache folder."""
    native_macros = _compiler_output(compiler, "-march=native", "-dM", "-E", "-x", "c", os.devnull)
    return {
        "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "compile_flags": " ".join(COMPILE_FLAGS),
        "compiler": compiler,
        "compiler_version": _compiler_output(compiler, "--version"),
        "machine": platform.machine(),
        "cpu_flags": cpu_flags(),
        "native_target": "\n".join(sorted(native_macros.splitlines())),
    }


def cache_key(fingerprint: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _build(compiler: str) -> Path:
    fingerprint = build_fingerprint(compiler)
    folder = cache_dir() / cache_key(fingerprint)
    library = folder / "cpu_kernels.so"
    if library.is_file():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / "cpu_kernels.so"
        errors = []
        # with OpenMP (the kernels then share torch's threads), else on one thread
        for openmp in (["-fopenmp"], ["-fopenmp-simd"], []):
            result = subprocess.run(
                [compiler, *COMPILE_FLAGS, *openmp, "-o", str(built), str(SOURCE)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                break
            errors.append(result.stderr.strip()[:300])
        else:
            raise RuntimeError(f"{compiler} failed on {SOURCE}: {' / '.join(errors)}")
        (folder / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1) + "\n")
        os.replace(built, library)  # atomic: concurrent processes see all or nothing
    return library


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    library = ctypes.CDLL(str(_build(compiler)))
    functions = {
        f"{name}_{suffix}": argtypes
        for name, argtypes in _SIGNATURES.items()
        for suffix in _SUFFIX.values()
    }
    for name, argtypes in {**functions, **_SINGLE}.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = None
    return library


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) when they cannot be built."""
    global _library, _loaded
    if _loaded:
        return _library
    with _load_lock:  # the two domains' passes may ask at once; one builds, both wait for it
        if not _loaded and os.environ.get("TWINVAE_CPU_KERNELS", "1") != "0":
            try:
                _library = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                warnings.warn(
                    f"twinvae: fused CPU kernels unavailable ({error}); training uses "
                    "PyTorch's element-wise ops instead (same results, slower). Set "
                    "TWINVAE_CPU_KERNELS=0 to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _loaded = True
    return _library


def available() -> bool:
    return library() is not None


# ---- layouts -----------------------------------------------------------------------------------


def is_dense(x: torch.Tensor) -> bool:
    """Whether ``x`` fills its memory without gaps in NCHW or channels-last order."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (and not also plainly contiguous)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format that reproduces ``x``'s layout: channels-last or contiguous."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def supports(x: torch.Tensor) -> bool:
    """Whether ``leaky_dropout`` handles ``x`` (dense CPU tensor of a supported dtype)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _SUFFIX
        and is_dense(x)
        and 0 < x.numel() < 2**32
        and available()
    )


def supports_batch_norm(x: torch.Tensor) -> bool:
    """Whether ``batch_norm_leaky`` handles ``x``: a 4-d channels-last CPU tensor."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in _SUFFIX
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.numel() > 0
        and available()
    )


def supports_noise(images: torch.Tensor) -> bool:
    """Whether ``add_noise`` handles ``images``: dense float32 CPU images (N, C, H, W)."""
    return (
        images.device.type == "cpu"
        and images.dtype == torch.float32
        and images.dim() == 4
        and is_dense(images)
        and 0 < images.numel() < 2**32
        and available()
    )


# ---- the operators -------------------------------------------------------------------------------

_operators = torch.library.Library("twinvae", "DEF")


def _operator(schema: str, cpu: Callable[..., Any], fake: Callable[..., Any]) -> None:
    """Define ``torch.ops.twinvae.<name>`` with its CPU and fake (shape-only) kernels."""
    name = schema.split("(", 1)[0]
    _operators.define(schema)
    _operators.impl(name, cpu, "CPU")
    torch.library.register_fake(f"twinvae::{name}", fake, lib=_operators)


def _call(name: str, tensors: Sequence[torch.Tensor], n: int, scalars: Sequence[Any]) -> None:
    """The C function ``name`` on items [0, n) and torch's number of threads (OpenMP inside
    the kernel; ctypes releases the GIL meanwhile)."""
    lib = library()
    if lib is None:
        raise RuntimeError("twinvae's CPU kernels are not built (see cpu_kernels.available())")
    getattr(lib, name)(*[t.data_ptr() for t in tensors], 0, n, *scalars, torch.get_num_threads())


def _typed(name: str, x: torch.Tensor) -> str:
    if x.dtype not in _SUFFIX or not is_dense(x) or x.device.type != "cpu":
        raise ValueError(f"twinvae::{name}: needs a dense bf16 or float32 CPU tensor, got {x}")
    return f"{name}_{_SUFFIX[x.dtype]}"


def _channels_last(name: str, x: torch.Tensor) -> str:
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"twinvae::{name}: needs a 4-d channels-last tensor")
    return _typed(name, x)


def _like(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` in ``x``'s dtype and layout (what the kernels index together)."""
    return grad.to(x.dtype).contiguous(memory_format=memory_format(x))


_DROPOUT_ARGS = "int key0, int key1, int threshold, float slope, float scale"


def _leaky_dropout_cpu(x: torch.Tensor, *scalars: Any) -> torch.Tensor:
    y = torch.empty_like(x)
    _call(_typed("leaky_dropout_forward", x), [x, y], x.numel(), scalars)
    return y


def _leaky_dropout_in_place_cpu(x: torch.Tensor, *scalars: Any) -> None:
    _call(_typed("leaky_dropout_forward", x), [x, x], x.numel(), scalars)


def _leaky_dropout_backward_cpu(grad: torch.Tensor, y: torch.Tensor, *scalars: Any) -> torch.Tensor:
    grad = _like(y, grad)
    grad_x = torch.empty_like(y)
    _call(_typed("leaky_dropout_backward", y), [grad, y, grad_x], y.numel(), scalars)
    return grad_x


_operator(
    f"leaky_dropout(Tensor x, {_DROPOUT_ARGS}) -> Tensor",
    _leaky_dropout_cpu,
    lambda x, *_: torch.empty_like(x),
)
_operator(
    f"leaky_dropout_(Tensor(a!) x, {_DROPOUT_ARGS}) -> ()",
    _leaky_dropout_in_place_cpu,
    lambda x, *_: None,
)
_operator(
    f"leaky_dropout_backward(Tensor grad, Tensor y, {_DROPOUT_ARGS}) -> Tensor",
    _leaky_dropout_backward_cpu,
    lambda grad, y, *_: torch.empty_like(y),
)


def _rows_and_chunks(x: torch.Tensor) -> tuple[int, int, int]:
    """Channels, rows (pixels) and chunks of ``_CHUNK_ROWS`` rows of a channels-last tensor."""
    channels = x.shape[1]
    rows = x.numel() // channels
    return channels, rows, -(-rows // _CHUNK_ROWS)


def _chunk_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 buffers (chunks, channels) for the kernels' per-chunk, per-channel sums."""
    channels, _, chunks = _rows_and_chunks(x)
    first = torch.empty(chunks, channels, dtype=torch.float64, device=x.device)
    return first, torch.empty_like(first)


def _vectors(x: torch.Tensor, *vectors: torch.Tensor) -> None:
    """The per-channel arguments: float32, contiguous, one value per channel of ``x``."""
    for vector in vectors:
        if vector.dtype != torch.float32 or not vector.is_contiguous():
            raise ValueError("twinvae batch-norm kernels: per-channel values must be float32")
        if vector.numel() != x.shape[1]:
            raise ValueError("twinvae batch-norm kernels: one value per channel expected")


def _batch_norm_stats_cpu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    name = _channels_last("bn_stats", x)
    channels, rows, chunks = _rows_and_chunks(x)
    sums, squares = _chunk_sums(x)
    _call(name, [x, sums, squares], chunks, [rows, channels, _CHUNK_ROWS])
    return sums, squares


def _batch_norm_leaky_cpu(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slope: float
) -> torch.Tensor:
    name = _channels_last("bn_leaky_forward", x)
    _vectors(x, a, b)
    channels, rows, _ = _rows_and_chunks(x)
    y = torch.empty_like(x)
    _call(name, [x, y, a, b], rows, [channels, slope])
    return y


def _batch_norm_leaky_backward_stats_cpu(
    grad: torch.Tensor, x: torch.Tensor, *vectors_and_slope: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    *vectors, slope = vectors_and_slope
    name = _channels_last("bn_leaky_backward_stats", x)
    _vectors(x, *vectors)
    grad = _like(x, grad)
    channels, rows, chunks = _rows_and_chunks(x)
    sums, products = _chunk_sums(x)
    _call(name, [grad, x, *vectors, sums, products], chunks, [rows, channels, _CHUNK_ROWS, slope])
    return sums, products


def _batch_norm_leaky_backward_cpu(
    grad: torch.Tensor, x: torch.Tensor, *vectors_and_slope: Any
) -> torch.Tensor:
    *vectors, slope = vectors_and_slope
    name = _channels_last("bn_leaky_backward", x)
    _vectors(x, *vectors)
    grad = _like(x, grad)
    channels, rows, _ = _rows_and_chunks(x)
    grad_x = torch.empty_like(x)
    _call(name, [grad, x, grad_x, *vectors], rows, [channels, slope])
    return grad_x


_STATS = "Tensor a, Tensor b, Tensor mean, Tensor invstd"
_operator(
    "batch_norm_stats(Tensor x) -> (Tensor, Tensor)",
    _batch_norm_stats_cpu,
    _chunk_sums,
)
_operator(
    "batch_norm_leaky(Tensor x, Tensor a, Tensor b, float slope) -> Tensor",
    _batch_norm_leaky_cpu,
    lambda x, *_: torch.empty_like(x),
)
_operator(
    f"batch_norm_leaky_backward_stats(Tensor grad, Tensor x, {_STATS}, float slope) "
    "-> (Tensor, Tensor)",
    _batch_norm_leaky_backward_stats_cpu,
    lambda grad, x, *_: _chunk_sums(x),
)
_operator(
    f"batch_norm_leaky_backward(Tensor grad, Tensor x, {_STATS}, Tensor k, Tensor mean_g, "
    "Tensor mean_gx, float slope) -> Tensor",
    _batch_norm_leaky_backward_cpu,
    lambda grad, x, *_: torch.empty_like(x),
)


def _images_outermost(images: torch.Tensor) -> torch.Tensor:
    """``images`` with each image in one block of memory (one noise level per image)."""
    return images.contiguous() if images.stride(0) != images[0].numel() else images


def _add_noise_cpu(
    images: torch.Tensor, levels: torch.Tensor, table: torch.Tensor, key0: int, key1: int
) -> torch.Tensor:
    if images.dtype != torch.float32 or images.dim() != 4 or not is_dense(images):
        raise ValueError("twinvae::add_noise: needs dense float32 images (N, C, H, W)")
    if levels.numel() != images.shape[0] or table.numel() != 2**16:
        raise ValueError("twinvae::add_noise: one level per image and 65536 quantiles expected")
    images = _images_outermost(images)
    out = torch.empty_like(images)
    levels32 = levels.detach().float().contiguous()
    table32 = table.float().contiguous()
    _call(
        "add_noise_f32",
        [images, out, levels32, table32],
        images.numel(),
        [images[0].numel(), key0, key1],
    )
    return out


_operator(
    "add_noise(Tensor images, Tensor levels, Tensor table, int key0, int key1) -> Tensor",
    _add_noise_cpu,
    lambda images, *_: torch.empty_like(_images_outermost(images)),
)


# ---- autograd ------------------------------------------------------------------------------------


class _LeakyDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, slope: float, p: float, inplace: bool) -> torch.Tensor:
        draws = torch.randint(0, 2**32, (2,), generator=passes.generator())
        keys = [int(k) for k in draws]
        threshold = min(round(p * 2**16), 2**16)
        scalars = (*keys, threshold, slope, 1.0 / (1.0 - p))
        if inplace:
            torch.ops.twinvae.leaky_dropout_(x, *scalars)
            y = x
            ctx.mark_dirty(x)
        else:
            y = torch.ops.twinvae.leaky_dropout(x, *scalars)
        ctx.save_for_backward(y)
        ctx.scalars = scalars
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (y,) = ctx.saved_tensors
        return torch.ops.twinvae.leaky_dropout_backward(grad, y, *ctx.scalars), None, None, None


def leaky_dropout(x: torch.Tensor, slope: float, p: float, inplace: bool = False) -> torch.Tensor:
    """``F.dropout(F.leaky_relu(x, slope), p, training=True)`` in one pass (see module doc).

    Needs ``supports(x)``. ``inplace`` overwrites ``x`` (for fresh outputs nobody else keeps).
    The drop probability is ``p`` rounded to a multiple of 2**-16.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return _LeakyDropout.apply(x, slope, p, inplace)


class _BatchNormLeaky(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        norm: torch.nn.BatchNorm2d,
        mean_shift: torch.Tensor | None,
        eps: float,
        slope: float,
    ) -> torch.Tensor:
        sums, squares = torch.ops.twinvae.batch_norm_stats(x)
        rows = x.numel() // x.shape[1]
        mean = sums.sum(0) / rows  # a fixed order of chunks: independent of the threads
        var = (squares.sum(0) / rows - mean.square()).clamp_min(0.0)
        invstd = (var + eps).rsqrt()
        gamma = torch.ones_like(mean) if weight is None else weight.detach().double()
        beta = torch.zeros_like(mean) if bias is None else bias.detach().double()
        a = (gamma * invstd).float()
        b = (beta - mean * gamma * invstd).float()
        y = torch.ops.twinvae.batch_norm_leaky(x, a, b, slope)
        shifted = mean if mean_shift is None else mean + mean_shift.double()
        passes.update_running_statistics(norm, shifted, var * (rows / max(rows - 1, 1)))
        ctx.save_for_backward(x, a, b, mean.float(), invstd.float(), gamma.float())
        ctx.slope = slope
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, b, mean, invstd, gamma = ctx.saved_tensors
        grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
        stats = (a, b, mean, invstd)
        sums, products = torch.ops.twinvae.batch_norm_leaky_backward_stats(
            grad, x, *stats, ctx.slope
        )
        rows = x.numel() // x.shape[1]
        sum_g, sum_gx = sums.sum(0), products.sum(0)
        k = gamma * invstd
        mean_g, mean_gx = (sum_g / rows).float(), (sum_gx / rows).float()
        grad_x = torch.ops.twinvae.batch_norm_leaky_backward(
            grad, x, *stats, k, mean_g, mean_gx, ctx.slope
        )
        weight_dtype, bias_dtype = ctx.param_dtypes
        grad_weight = sum_gx.to(weight_dtype) if weight_dtype is not None else None
        grad_bias = sum_g.to(bias_dtype) if bias_dtype is not None else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


def batch_norm_leaky(
    x: torch.Tensor,
    norm: torch.nn.BatchNorm2d,
    slope: float,
    mean_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.leaky_relu(norm(x), slope)`` for a batch norm in training mode, in two passes over
    memory forward and two backward (PyTorch: five and five). Updates the running statistics
    as ``norm`` does (through `passes`), of ``x + mean_shift`` when given: a per-channel
    constant added before a batch norm changes only its running mean.
    Needs ``supports_batch_norm(x)``."""
    if not norm.training:
        raise ValueError("batch_norm_leaky is for batch norms in training mode")
    shift = None if mean_shift is None else mean_shift.detach()
    return _BatchNormLeaky.apply(x, norm.weight, norm.bias, norm, shift, norm.eps, slope)


_normal_table: torch.Tensor | None = None


def _standard_normal_quantiles() -> torch.Tensor:
    """The 65536 quantiles (k + 1/2) / 65536 of N(0, 1), scaled to unit variance."""
    global _normal_table
    if _normal_table is None:
        levels = (torch.arange(2**16, dtype=torch.float64) + 0.5) / 2**16
        table = torch.special.ndtri(levels)
        _normal_table = (table / table.square().mean().sqrt()).float()
    return _normal_table


def add_noise(
    images: torch.Tensor, levels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(images + levels[n] * N(0, 1)).clamp(0, 1)`` per image n, in one pass; the noise is
    drawn by 16-bit inverse transform sampling (tails cut at 4.3 standard deviations) from a
    hash keyed by ``generator``. Needs ``supports_noise(images)``."""
    keys = [int(k) for k in torch.randint(0, 2**32, (2,), generator=generator)]
    return torch.ops.twinvae.add_noise(images, levels, _standard_normal_quantiles(), *keys)
