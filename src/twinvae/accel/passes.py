"""Independent passes: what lets the two domains' passes run side by side on two threads.

A training pass of the Twin-VAE draws random numbers (dropout masks, the sampled z) and moves
the running statistics of its batch norms, one of which both domains share. Inside
`independent_pass` the accelerated modules (`twinvae.accel.modules`) draw from the pass's own
generator instead of torch's global one, and their running-statistics updates wait in a list
until `apply_running_updates` makes them in the order the caller chooses. Two passes on two
threads then give the same numbers as the same two passes one after the other, whatever the
threads' timing. PyTorch's own ``nn.Dropout`` and ``nn.BatchNorm2d`` know nothing of this:
a model must be accelerated before its passes run on threads (`require_independent_passes`).

The state is per OS thread; a generator lives on the CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RunningUpdate:
    """One batch's statistics for ``norm``'s running mean and (unbiased) variance."""

    norm: nn.BatchNorm2d
    mean: torch.Tensor
    unbiased_var: torch.Tensor


class _PassState(threading.local):
    generator: torch.Generator | None = None
    pending: list[RunningUpdate] | None = None


_state = _PassState()


def generator() -> torch.Generator | None:
    """The generator of the current thread's independent pass (None: torch's global one)."""
    return _state.generator


@contextmanager
def independent_pass(pass_generator: torch.Generator) -> Iterator[list[RunningUpdate]]:
    """Within: random draws from ``pass_generator``; running-statistics updates collected in
    the yielded list instead of made (see the module doc)."""
    if _state.pending is not None:
        raise RuntimeError("independent passes do not nest")
    pending: list[RunningUpdate] = []
    _state.generator, _state.pending = pass_generator, pending
    try:
        yield pending
    finally:
        _state.generator, _state.pending = None, None


def update_running_statistics(
    norm: nn.BatchNorm2d, mean: torch.Tensor, unbiased_var: torch.Tensor
) -> None:
    """Count one batch and move ``norm``'s running statistics toward it, as ``nn.BatchNorm2d``
    does in training; deferred inside an independent pass."""
    if not norm.track_running_stats or norm.running_mean is None or norm.running_var is None:
        return
    update = RunningUpdate(norm, mean.detach(), unbiased_var.detach())
    if _state.pending is not None:
        _state.pending.append(update)
    else:
        _apply(update)


def apply_running_updates(updates: list[RunningUpdate]) -> None:
    """Make the deferred updates of an independent pass, in list order."""
    for update in updates:
        _apply(update)


@torch.no_grad()
def _apply(update: RunningUpdate) -> None:
    norm = update.norm
    assert norm.running_mean is not None and norm.running_var is not None
    factor = norm.momentum
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if factor is None:  # cumulative average, as nn.BatchNorm2d computes it
            factor = 1.0 / float(norm.num_batches_tracked)
    assert factor is not None
    norm.running_mean.mul_(1.0 - factor).add_(update.mean.to(norm.running_mean.dtype), alpha=factor)
    norm.running_var.mul_(1.0 - factor).add_(
        update.unbiased_var.to(norm.running_var.dtype), alpha=factor
    )
