"""Transfer strategies (paper section 3): which parameter groups train at which epoch."""

from __future__ import annotations

from torch import nn

from twinvae.config import TransferConfig
from twinvae.models.twin_vae import TwinVAE, set_trainable

ALL_GROUPS = ("outer", "core", "regressor")

FROZEN_GROUPS: dict[str, tuple[str, ...]] = {
    "simultaneous": (),
    "frozen-outer": ("outer",),
    "frozen-core": ("core",),
}


def trainable_groups(transfer: TransferConfig | None, epoch: int, total_epochs: int) -> set[str]:
    """Names of the groups (see TwinVAE.parameter_groups) that train in ``epoch``."""
    if transfer is None:
        return {"outer", "core", "regressor"}
    if transfer.strategy == "thaw":
        stages = transfer.thaw_stages
        stage = min(len(stages) - 1, epoch * len(stages) // max(total_epochs, 1))
        return {group for groups in stages[: stage + 1] for group in groups}
    frozen = set(FROZEN_GROUPS[transfer.strategy])
    return {g for g in ALL_GROUPS if g not in frozen}


def apply_trainable(model: TwinVAE, groups: set[str]) -> list[nn.Module]:
    """Freeze everything, then unfreeze ``groups``; returns the frozen top-level modules."""
    named = model.parameter_groups()
    unknown = groups - named.keys()
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; known: {sorted(named)}")
    set_trainable([model], False)
    for group in groups:
        set_trainable(named[group], True)
    return [
        module
        for module in (
            *model.encoders.values(),
            *model.decoders.values(),
            model.shared_encoder,
            model.shared_decoder,
            model.regressor,
        )
        if not any(p.requires_grad for p in module.parameters())
    ]
