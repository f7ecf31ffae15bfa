"""Device, precision and distributed set-up: CUDA when present, CPU otherwise.

Library code changes no process-wide setting for good: `setup_runtime` sets torch's thread count
only when the config asks for one, and `teardown_runtime` restores it. Settings that cannot be
undone (glibc's malloc tuning, `twinvae.cli.process`) are made by the twinvae command alone.
"""

from __future__ import annotations

import contextlib
import os
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
    threads_before: int | None = None  # torch's thread count before setup_runtime changed it

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


def setup_runtime(config: TrainConfig) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start DDP if needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(config.device, local_rank)
    threads_before = None
    if device.type == "cpu" and config.num_threads is not None:
        threads_before = torch.get_num_threads()
        torch.set_num_threads(config.num_threads)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    precision = select_precision(config.precision, device)
    return Runtime(device, precision, rank, world_size, threads_before)


def teardown_runtime(runtime: Runtime) -> None:
    """Undo `setup_runtime`: end DDP, give torch back the thread count it had."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
    if runtime.threads_before is not None:
        torch.set_num_threads(runtime.threads_before)
