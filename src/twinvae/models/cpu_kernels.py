"""Fused element-wise CPU kernels for training, compiled from ``cpu_kernels.c`` on first use.

PyTorch runs LeakyReLU, dropout and batch norm as separate passes over memory (and draws
dropout masks with a slow per-element generator); at the 61 and 62 px layers these passes cost
more than some convolutions. Two fused operations, forward and backward:

- ``leaky_dropout``: LeakyReLU + inverted dropout in one pass. The mask is never stored: it is
  a hash of the element index and a seed drawn from torch's RNG (``torch.manual_seed`` makes
  runs reproducible; inside a `domain_pass.independent_pass`, from the pass's generator), which
  the backward pass recomputes.
- ``batch_norm_leaky``: batch norm with batch statistics + LeakyReLU in two passes (statistics,
  then output), backward in two; statistics are summed in double.

Results do not depend on the number of threads. The kernels use OpenMP on torch's threads
(built with ``-fopenmp`` against the ``libgomp`` torch loaded; without OpenMP on one thread).
The C source is compiled with the system C compiler (``$CC``, else ``cc``) into a cache folder
(``$TWINVAE_CACHE``, else ``$XDG_CACHE_HOME/twinvae``, else ``~/.cache/twinvae``), once per
source, compiler and CPU. Without a compiler, or with ``TWINVAE_CPU_KERNELS=0``, ``available()``
is False and callers use PyTorch's ops (same function up to rounding, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from twinvae.models import domain_pass

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


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("TWINVAE_CACHE"):
        return Path(os.environ["TWINVAE_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "twinvae" / "kernels"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the machine and its CPU feature flags."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    parts = [source, compiler.encode(), " ".join(COMPILE_FLAGS).encode()]
    key = hashlib.sha256(b"\0".join([*parts, _cpu_fingerprint().encode()])).hexdigest()[:16]
    folder = cache_dir() / key
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


def _run(function: Any, pointers: list[int], n: int, scalars: list[Any]) -> None:
    """``function(*pointers, 0, n, *scalars, threads)`` on torch's number of threads (OpenMP
    inside the kernel; ctypes releases the GIL meanwhile)."""
    function(*pointers, 0, n, *scalars, torch.get_num_threads())


class _LeakyDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, slope: float, p: float, inplace: bool) -> torch.Tensor:
        lib = library()
        assert lib is not None
        draws = torch.randint(0, 2**32, (2,), generator=domain_pass.generator())
        keys = [int(k) for k in draws]
        threshold = min(round(p * 2**16), 2**16)
        scale = 1.0 / (1.0 - p)
        y = x if inplace else torch.empty_like(x)
        function = getattr(lib, f"leaky_dropout_forward_{_SUFFIX[x.dtype]}")
        scalars = [*keys, threshold, slope, scale]
        _run(function, _pointers(x, y), x.numel(), scalars)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(y)
        ctx.scalars = scalars
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        lib = library()
        assert lib is not None
        (y,) = ctx.saved_tensors
        grad = grad.to(y.dtype).contiguous(memory_format=memory_format(y))
        grad_x = torch.empty_like(y)
        function = getattr(lib, f"leaky_dropout_backward_{_SUFFIX[y.dtype]}")
        _run(function, _pointers(grad, y, grad_x), y.numel(), ctx.scalars)
        return grad_x, None, None, None


def leaky_dropout(x: torch.Tensor, slope: float, p: float, inplace: bool = False) -> torch.Tensor:
    """``F.dropout(F.leaky_relu(x, slope), p, training=True)`` in one pass (see module doc).

    Needs ``supports(x)``. ``inplace`` overwrites ``x`` (for fresh outputs nobody else keeps).
    The drop probability is ``p`` rounded to a multiple of 2**-16.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return _LeakyDropout.apply(x, slope, p, inplace)


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


def _pointers(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _rows_and_chunks(x: torch.Tensor) -> tuple[int, int, int]:
    """Channels, rows (pixels) and chunks of ``_CHUNK_ROWS`` rows of a channels-last tensor."""
    channels = x.shape[1]
    rows = x.numel() // channels
    return channels, rows, -(-rows // _CHUNK_ROWS)


def _chunk_sums(chunks: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 buffers for the kernels' per-chunk, per-channel sums."""
    first = torch.empty(chunks, channels, dtype=torch.float64)
    return first, torch.empty_like(first)


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
        lib = library()
        assert lib is not None
        suffix = _SUFFIX[x.dtype]
        channels, rows, chunks = _rows_and_chunks(x)
        sums, squares = _chunk_sums(chunks, channels)
        _run(
            getattr(lib, f"bn_stats_{suffix}"),
            _pointers(x, sums, squares),
            chunks,
            [rows, channels, _CHUNK_ROWS],
        )
        mean = sums.sum(0) / rows  # a fixed order of chunks: independent of the threads
        var = (squares.sum(0) / rows - mean.square()).clamp_min(0.0)
        invstd = (var + eps).rsqrt()
        gamma = torch.ones_like(mean) if weight is None else weight.detach().double()
        beta = torch.zeros_like(mean) if bias is None else bias.detach().double()
        a = (gamma * invstd).float()
        b = (beta - mean * gamma * invstd).float()
        y = torch.empty_like(x)
        _run(
            getattr(lib, f"bn_leaky_forward_{suffix}"),
            _pointers(x, y, a, b),
            rows,
            [channels, slope],
        )
        shifted = mean if mean_shift is None else mean + mean_shift.double()
        domain_pass.update_running_statistics(norm, shifted, var * (rows / max(rows - 1, 1)))
        ctx.save_for_backward(x, a, b, mean.float(), invstd.float(), gamma.float())
        ctx.slope = slope
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        lib = library()
        assert lib is not None
        x, a, b, mean, invstd, gamma = ctx.saved_tensors
        suffix = _SUFFIX[x.dtype]
        grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
        channels, rows, chunks = _rows_and_chunks(x)
        sums, products = _chunk_sums(chunks, channels)
        _run(
            getattr(lib, f"bn_leaky_backward_stats_{suffix}"),
            _pointers(grad, x, a, b, mean, invstd, sums, products),
            chunks,
            [rows, channels, _CHUNK_ROWS, ctx.slope],
        )
        sum_g, sum_gx = sums.sum(0), products.sum(0)
        grad_x = torch.empty_like(x)
        k = gamma * invstd
        mean_g, mean_gx = (sum_g / rows).float(), (sum_gx / rows).float()
        _run(
            getattr(lib, f"bn_leaky_backward_{suffix}"),
            _pointers(grad, x, grad_x, a, b, mean, invstd, k, mean_g, mean_gx),
            rows,
            [channels, ctx.slope],
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
    as ``norm`` does (through `domain_pass`), of ``x + mean_shift`` when given: a per-channel
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


def add_noise(
    images: torch.Tensor, levels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(images + levels[n] * N(0, 1)).clamp(0, 1)`` per image n, in one pass; the noise is
    drawn by 16-bit inverse transform sampling (tails cut at 4.3 standard deviations) from a
    hash keyed by ``generator``. Needs ``supports_noise(images)``."""
    lib = library()
    assert lib is not None
    keys = [int(k) for k in torch.randint(0, 2**32, (2,), generator=generator)]
    # one level per image: the images must be the outermost dimension in memory
    images = images.contiguous() if images.stride(0) != images[0].numel() else images
    out = torch.empty_like(images)
    levels32 = levels.detach().float().contiguous()
    pointers = _pointers(images, out, levels32, _standard_normal_quantiles())
    _run(lib.add_noise_f32, pointers, images.numel(), [images[0].numel(), *keys])
    return out
