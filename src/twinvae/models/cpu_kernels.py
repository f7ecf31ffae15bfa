"""Fused element-wise CPU kernels for training, compiled from ``cpu_kernels.c`` on first use.

PyTorch runs LeakyReLU and dropout as separate passes over memory (and draws the dropout mask
with a slow per-element generator); at the 62 x 62 px layers these passes cost more than some
convolutions. ``leaky_dropout`` does both in one pass, forward and backward, and never stores
the mask (it is a hash of the element index and a seed drawn from torch's RNG, so
``torch.manual_seed`` makes runs reproducible).

The C source is compiled with the system C compiler (``$CC``, else ``cc``) into a cache folder
(``$TWINVAE_CACHE``, else ``$XDG_CACHE_HOME/twinvae``, else ``~/.cache/twinvae``), once per
source, compiler and CPU. Without a compiler, or with ``TWINVAE_CPU_KERNELS=0``, ``available()``
is False and callers use PyTorch's ops (same function, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
COMPILE_FLAGS = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC")
_FUNCTIONS = {
    "leaky_dropout_forward": 2,  # number of leading pointer arguments
    "leaky_dropout_backward": 3,
}
_SCALARS = [ctypes.c_int64, ctypes.c_int64] + [ctypes.c_uint32] * 3 + [ctypes.c_float] * 2
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
# below this many elements one thread does the whole tensor
_ELEMENTS_PER_THREAD = 1 << 16

_library: ctypes.CDLL | None = None
_loaded = False
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


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
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                compiler.encode(),
                " ".join(COMPILE_FLAGS).encode(),
                _cpu_fingerprint().encode(),
            ]
        )
    ).hexdigest()[:16]
    folder = cache_dir() / key
    library = folder / "cpu_kernels.so"
    if library.is_file():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / "cpu_kernels.so"
        result = subprocess.run(
            [compiler, *COMPILE_FLAGS, "-o", str(built), str(SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE}: {result.stderr.strip()[:500]}")
        os.replace(built, library)  # atomic: concurrent processes see all or nothing
    return library


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH")
    library = ctypes.CDLL(str(_build(compiler)))
    for name, pointers in _FUNCTIONS.items():
        for suffix in _SUFFIX.values():
            function = getattr(library, f"{name}_{suffix}")
            function.argtypes = [ctypes.c_void_p] * pointers + _SCALARS
            function.restype = None
    return library


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) when they cannot be built."""
    global _library, _loaded
    if not _loaded:
        _loaded = True
        if os.environ.get("TWINVAE_CPU_KERNELS", "1") != "0":
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
    return _library


def available() -> bool:
    return library() is not None


def supports(x: torch.Tensor) -> bool:
    """Whether ``leaky_dropout`` handles ``x`` (dense CPU tensor of a supported dtype)."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return (
        x.device.type == "cpu"
        and x.dtype in _SUFFIX
        and dense
        and 0 < x.numel() < 2**32
        and available()
    )


def _in_parallel(function: Any, pointers: list[int], n: int, scalars: list[Any]) -> None:
    """Run ``function(*pointers, start, stop, *scalars)`` over [0, n) on torch's thread count."""
    global _pool, _pool_workers
    parts = max(1, min(torch.get_num_threads(), n // _ELEMENTS_PER_THREAD))
    cuts = [n * k // parts // 16 * 16 for k in range(parts)] + [n]
    if parts == 1:
        function(*pointers, 0, n, *scalars)
        return
    if _pool is None or _pool_workers < parts - 1:
        _pool = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="twinvae-kernel")
        _pool_workers = parts - 1
    # ctypes releases the GIL during each call, so the parts run at the same time
    futures = [
        _pool.submit(partial(function, *pointers, cuts[k], cuts[k + 1], *scalars))
        for k in range(1, parts)
    ]
    function(*pointers, cuts[0], cuts[1], *scalars)
    for future in futures:
        future.result()


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class _LeakyDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, slope: float, p: float, inplace: bool) -> torch.Tensor:
        lib = library()
        assert lib is not None
        keys = [int(k) for k in torch.randint(0, 2**32, (2,), dtype=torch.int64)]
        threshold = min(round(p * 2**16), 2**16)
        scale = 1.0 / (1.0 - p)
        y = x if inplace else torch.empty_like(x)
        function = getattr(lib, f"leaky_dropout_forward_{_SUFFIX[x.dtype]}")
        scalars = [*keys, threshold, slope, scale]
        _in_parallel(function, [x.data_ptr(), y.data_ptr()], x.numel(), scalars)
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
        grad = grad.to(y.dtype).contiguous(memory_format=_layout(y))
        grad_x = torch.empty_like(y)
        function = getattr(lib, f"leaky_dropout_backward_{_SUFFIX[y.dtype]}")
        pointers = [grad.data_ptr(), y.data_ptr(), grad_x.data_ptr()]
        _in_parallel(function, pointers, y.numel(), ctx.scalars)
        return grad_x, None, None, None


def leaky_dropout(x: torch.Tensor, slope: float, p: float, inplace: bool = False) -> torch.Tensor:
    """``F.dropout(F.leaky_relu(x, slope), p, training=True)`` in one pass (see module doc).

    Needs ``supports(x)``. ``inplace`` overwrites ``x`` (for fresh outputs nobody else keeps).
    The drop probability is ``p`` rounded to a multiple of 2**-16.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return _LeakyDropout.apply(x, slope, p, inplace)
