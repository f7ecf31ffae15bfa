"""The exported network: the Twin-VAE's deterministic natural path.

The bundle's ``pytorch_state_dict`` weights are loaded by bioimage.io tools into
``TwinVAECountingNetwork`` of the file ``twinvae_counting_network.py`` in the bundle: the source
of `twinvae.models.counting_network`, which imports nothing but torch and defines the blocks the
Twin-VAE itself is built from, so one state dict fits both.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinvae.errors import ExportError
from twinvae.models.twin_vae import DomainName, ModelConfig, TwinVAE

ARCHITECTURE_FILE = "twinvae_counting_network.py"
ARCHITECTURE_CALLABLE = "TwinVAECountingNetwork"
INPUT_ID = "raw"
COUNT_ID = "count"
MU_ID = "mu"


def architecture_source() -> bytes:
    """The bytes of the standalone architecture file bundles ship (as ``ARCHITECTURE_FILE``)."""
    return (resources.files("twinvae.models") / "counting_network.py").read_bytes()


def architecture_sha256() -> str:
    return hashlib.sha256(architecture_source()).hexdigest()


@dataclass(frozen=True)
class NetworkSpec:
    """What the exported network is: sizes of the Twin-VAE and whether mu is an output."""

    model: ModelConfig
    with_mu: bool = False
    domain: DomainName = "natural"

    @property
    def output_ids(self) -> tuple[str, ...]:
        return (COUNT_ID, MU_ID) if self.with_mu else (COUNT_ID,)

    def architecture_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``TwinVAECountingNetwork`` (plain YAML values)."""
        return {
            "base_channels": self.model.base_channels,
            "latent_dim": self.model.latent_dim,
            "regressor_hidden": list(self.model.regressor_hidden),
            "dropout": self.model.dropout,
            "leaky_slope": self.model.leaky_slope,
            "regressor_input": self.model.regressor_input,
            "standardize_input": self.model.standardize_input,
            "with_mu": self.with_mu,
        }


def network_state(twin: TwinVAE, domain: DomainName = "natural") -> dict[str, torch.Tensor]:
    """The counting path's weights as independent, contiguous CPU tensors (no shared storage)."""
    network = twin.counting_network(domain)
    return {
        key: value.detach().to("cpu").clone().contiguous()
        for key, value in network.state_dict().items()
    }


def build_network(spec: NetworkSpec, state: dict[str, torch.Tensor]) -> nn.Module:
    """twinvae's own counting network (eval mode) holding ``state``: the export reference."""
    twin = TwinVAE(spec.model)
    network = twin.counting_network(spec.domain, with_mu=spec.with_mu)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ExportError(f"weights do not fit the configured model: {error}") from error
    return network.eval()


def load_standalone_class(source_file: Path, callable_name: str = ARCHITECTURE_CALLABLE) -> Any:
    """Import the architecture callable from a source file (as bioimage.io tools do).

    This executes the file: only use it on bundles whose code you are willing to run.
    """
    module_name = (
        f"_twinvae_bundle_architecture_{hashlib.sha256(source_file.read_bytes()).hexdigest()[:16]}"
    )
    spec = importlib.util.spec_from_file_location(module_name, source_file)
    if spec is None or spec.loader is None:
        raise ExportError(f"{source_file}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(module_name, None)
        raise ExportError(f"{source_file}: importing the architecture failed: {error}") from error
    if not hasattr(module, callable_name):
        raise ExportError(f"{source_file}: defines no {callable_name!r}")
    return getattr(module, callable_name)
