"""The resolved runtime of a run, recorded in its checkpoints and compared on resume.

Precision ``auto``, the CPU kernels, the step strategy and the thread count are resolved on the
machine that trains. Some of them change which random numbers a run draws (the C kernels and
PyTorch's dropout draw different masks), others only the rounding; a resume on another runtime
therefore cannot repeat an uninterrupted run exactly, and says so.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from twinvae.training.device import Runtime

# what a difference in each entry does to the resumed epochs
EFFECTS = {
    "device": "other kernels and random numbers",
    "precision": "other rounding throughout",
    "processes": "other batches per step",
    "step": "other random streams",
    "cpu_kernels": "other dropout masks",
    "threads": "other rounding",
    "cpu_capability": "other rounding",
    "onednn_max_cpu_isa": "other rounding",
    "torch": "possibly other kernels",
}


def _cpu_kernels_in_use(model: nn.Module, runtime: Runtime) -> bool:
    if runtime.device.type != "cpu":
        return False
    from twinvae.accel import uses_cpu_kernels  # the CPU acceleration code: imported where needed

    return uses_cpu_kernels(model)


def describe_runtime(runtime: Runtime, model: nn.Module, step_description: str) -> dict[str, str]:
    """How this run computes, as strings (the keys of `EFFECTS`)."""
    device = runtime.device.type
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(runtime.device)})"
    return {
        "device": device,
        "precision": runtime.precision,
        "processes": str(runtime.world_size),
        "step": step_description,
        "cpu_kernels": "on" if _cpu_kernels_in_use(model, runtime) else "off",
        "threads": str(torch.get_num_threads()),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
        "torch": str(torch.__version__),  # a str subclass that weights_only cannot load
    }


def runtime_differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """``key old -> new (effect)`` for every recorded entry that differs now (entries a
    checkpoint did not record are not compared)."""
    return [
        f"{key} {recorded[key]} -> {value} ({EFFECTS.get(key, 'other numbers')})"
        for key, value in current.items()
        if key in recorded and recorded[key] != value
    ]
