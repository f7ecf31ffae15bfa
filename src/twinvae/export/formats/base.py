"""The interface every weight-format adapter implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from twinvae.export.network import NetworkSpec

Runner = Callable[[np.ndarray], list[np.ndarray]]
"""Model-space images (N, 1, 128, 128) float32 in [0, 1] -> outputs (count (N, 1)[, mu])."""


class WeightFormat(Protocol):
    """Writes and runs one weights format."""

    name: str
    """The bioimage.io weights format key, e.g. "onnx"."""

    file_name: str
    """The weights file name inside the bundle."""

    def write(
        self, network: nn.Module, spec: NetworkSpec, folder: Path, example: torch.Tensor
    ) -> dict[str, Any]:
        """Write the weights file(s) into folder; return the rdf weights entry (no sha256)."""
        ...

    def runner(self, folder: Path, entry: Mapping[str, Any]) -> Runner:
        """Load the weights described by an rdf entry, relative to the unpacked bundle folder."""
        ...


def as_output_list(
    result: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor],
) -> list[np.ndarray]:
    """A network's output (a tensor or a tuple of tensors) as float32 numpy arrays."""
    tensors = [result] if isinstance(result, torch.Tensor) else list(result)
    return [t.detach().cpu().numpy().astype(np.float32) for t in tensors]


def entry_source(folder: Path, entry: Mapping[str, Any], what: str) -> Path:
    """The local file an rdf entry's ``source`` names (must stay inside the bundle folder)."""
    source = entry.get("source")
    if not isinstance(source, str) or not source:
        raise ValueError(f"{what}: missing 'source'")
    path = (folder / source).resolve()
    if folder.resolve() not in path.parents or not path.is_file():
        raise FileNotFoundError(f"{what}: file {source!r} is not in the bundle")
    return path
