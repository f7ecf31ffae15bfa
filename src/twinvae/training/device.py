"""Device, precision and distributed set-up: CUDA when present, CPU otherwise."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from twinvae.config import TrainConfig
from twinvae.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision for the forward pass when the run asked for it."""
        dtype = self.autocast_dtype
        if dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available, otherwise the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), not by emulation."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def select_precision(requested: str, device: torch.device) -> str:
    """``auto``: fp16 autocast on CUDA; on the CPU bf16 autocast where the CPU has bf16
    hardware (about 2x faster training at unchanged accuracy, see benchmarks/README.md),
    else fp32. fp16 is refused on the CPU."""
    if requested == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision 'fp16' needs CUDA; use 'bf16' or 'fp32' on the CPU")
    return requested


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters of glibc's malloc.h
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory (up to 1 GiB) for reuse by this process.

    A training step allocates and frees the same large activation buffers every time. By
    default glibc maps buffers above 32 MB freshly from the OS and returns free heap above
    64 MB, so every step page-faults tens of megabytes in again (~20,000 faults per CPU step
    of the paper-size model, a few % of its time). Process-wide and only with glibc; off with
    ``TWINVAE_KEEP_FREED_MEMORY=0``. Returns whether the setting was applied.
    """
    if os.environ.get("TWINVAE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [mallopt(option, _KEEP_BYTES) for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)]
    return all(result == 1 for result in applied)


def setup_runtime(config: TrainConfig) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start DDP if needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(config.device, local_rank)
    if device.type == "cpu":
        keep_freed_memory()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return Runtime(device, select_precision(config.precision, device), rank, world_size)


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
