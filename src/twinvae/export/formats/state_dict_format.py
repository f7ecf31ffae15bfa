"""pytorch_state_dict weights: a weights_only-loadable .pt plus the standalone architecture."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twinvae.export.formats.base import Runner, as_output_list, entry_source
from twinvae.export.network import (
    ARCHITECTURE_CALLABLE,
    ARCHITECTURE_FILE,
    NetworkSpec,
    architecture_source,
    load_standalone_class,
)


class StateDictFormat:
    """The parent format: state dict of the counting path, architecture as a source file."""

    name = "pytorch_state_dict"
    file_name = "weights.pt"

    def write(
        self, network: nn.Module, spec: NetworkSpec, folder: Path, example: torch.Tensor
    ) -> dict[str, Any]:
        state = {k: v.detach().cpu().clone().contiguous() for k, v in network.state_dict().items()}
        torch.save(state, folder / self.file_name)
        (folder / ARCHITECTURE_FILE).write_bytes(architecture_source())
        return {
            "source": self.file_name,
            "architecture": {
                "source": ARCHITECTURE_FILE,
                "callable": ARCHITECTURE_CALLABLE,
                "kwargs": spec.architecture_kwargs(),
            },
            "pytorch_version": torch.__version__.split("+")[0],
        }

    def runner(self, folder: Path, entry: Mapping[str, Any]) -> Runner:
        """Imports the bundle's architecture file, i.e. runs Python from the bundle: the checks
        call this only with trust_code (see twinvae.export.checks.CODE_FORMATS)."""
        architecture = entry.get("architecture")
        if not isinstance(architecture, Mapping):
            raise ValueError("pytorch_state_dict: missing 'architecture'")
        source_file = entry_source(folder, architecture, "pytorch_state_dict architecture")
        network_class = load_standalone_class(source_file, str(architecture.get("callable")))
        network: nn.Module = network_class(**dict(architecture.get("kwargs") or {}))
        weights = entry_source(folder, entry, "pytorch_state_dict")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True)
        network.eval()

        def run(images: np.ndarray) -> list[np.ndarray]:
            with torch.no_grad():
                return as_output_list(network(torch.from_numpy(images)))

        return run
