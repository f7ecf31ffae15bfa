"""The Twin-VAE: two VAEs (natural, synthetic) sharing inner layers and a cell-count regressor.

Layer sizes follow the authors' reference implementation (Stallmann et al. 2021; Kenneweg,
Stallmann, Hammer 2023) for 128 x 128 grey images, with c = base_channels (32 in the papers):

    outer encoder (per domain)  128 -> 62 -> 29 -> 13 -> 5 px, channels 1 -> c -> 2c -> 4c -> 8c
    shared encoder              5 -> 1 px, 8c -> 16c, then fc_mu / fc_logvar 16c -> latent
    z = mu + exp(logvar / 2) * eps (training), else mu
    shared decoder              latent -> 16c (fc), 1 -> 5 px, 16c -> 8c
    outer decoder (per domain)  5 -> 13 -> 29 -> 61 -> 62 -> 128 px, sigmoid output
    regressor                   mu -> 256 -> 128 -> 1 (raw count)

The counting path's blocks (encoders, shared layers, regressor) are those of
`counting_network`, the file bioimage.io bundles ship. These are plain PyTorch modules; faster
CPU training is a separate layer that swaps some of them (`twinvae.accel.accelerate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from twinvae.config import ModelConfig
from twinvae.models.counting_network import (
    CountingNetwork,
    OuterEncoder,
    Regressor,
    SharedDecoder,
    SharedEncoder,
    deconv_block,
    regressor_in_features,
)

DomainName = Literal["natural", "synthetic"]
DOMAINS: tuple[DomainName, DomainName] = ("natural", "synthetic")
MODEL_IMAGE_SIZE = 128


class OuterDecoder(nn.Sequential):
    """Domain-specific outer decoder: (N, 8c, 5, 5) -> (N, 1, 128, 128) in [0, 1]."""

    def __init__(self, cfg: ModelConfig) -> None:
        c, slope = cfg.base_channels, cfg.leaky_slope
        super().__init__(
            *deconv_block(8 * c, 4 * c, 5, 2, slope),  # 5 -> 13
            *deconv_block(4 * c, 2 * c, 5, 2, slope),  # 13 -> 29
            *deconv_block(2 * c, c, 5, 2, slope),  # 29 -> 61
            *deconv_block(c, c, 2, 1, slope),  # 61 -> 62
            nn.ConvTranspose2d(c, 1, kernel_size=6, stride=2),  # 62 -> 128
            nn.Sigmoid(),
        )


class GaussianSample(nn.Module):
    """The reparameterisation trick: z = mu + exp(logvar / 2) * eps, eps ~ N(0, I)."""

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=self.generator())
        return mu + noise * torch.exp(0.5 * logvar)

    def generator(self) -> torch.Generator | None:
        """Where eps comes from: torch's global generator."""
        return None


@dataclass
class TwinOutput:
    """Everything one forward pass of one domain produces (recon is None when not decoded)."""

    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor
    count: torch.Tensor
    recon: torch.Tensor | None


class TwinVAE(nn.Module):
    """Two VAEs with domain-specific outer layers and shared inner layers and regressor.

    Parameter groups (used by the transfer strategies): ``outer`` = encoders + decoders,
    ``core`` = shared encoder + shared decoder, ``regressor``.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        cfg = self.config
        c, slope, dropout = cfg.base_channels, cfg.leaky_slope, cfg.dropout
        self.encoders = nn.ModuleDict(
            {d: OuterEncoder(c, slope, dropout, cfg.standardize_input) for d in DOMAINS}
        )
        self.shared_encoder = SharedEncoder(c, cfg.latent_dim, slope, dropout)
        self.shared_decoder = SharedDecoder(c, cfg.latent_dim, slope)
        self.decoders = nn.ModuleDict({d: OuterDecoder(cfg) for d in DOMAINS})
        regressor_in = regressor_in_features(c, cfg.latent_dim, cfg.regressor_input)
        self.regressor = Regressor(regressor_in, cfg.regressor_hidden, slope, dropout)
        self.reparameterize = GaussianSample()
        if cfg.init == "orthogonal":
            self.apply(_orthogonal_init)

    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        """Modules by transfer group: outer, outer_natural, outer_synthetic, core, regressor."""
        return {
            "outer_natural": [self.encoders["natural"], self.decoders["natural"]],
            "outer_synthetic": [self.encoders["synthetic"], self.decoders["synthetic"]],
            "outer": [*self.encoders.values(), *self.decoders.values()],
            "core": [self.shared_encoder, self.shared_decoder],
            "regressor": [self.regressor],
        }

    def encode(self, images: torch.Tensor, domain: DomainName) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 1, 128, 128) in [0, 1] -> mu, logvar (N, latent)."""
        return self.shared_encoder(self.encoders[domain](images))

    def decode(self, z: torch.Tensor, domain: DomainName) -> torch.Tensor:
        """Latent codes (N, latent) -> images (N, 1, 128, 128) of the given domain."""
        return self.decoders[domain](self.shared_decoder(z))

    def regress(self, mu: torch.Tensor) -> torch.Tensor:
        """Latent mean (N, latent) -> counts (N,)."""
        features = (
            mu if self.config.regressor_input == "latent" else self.shared_decoder(mu).flatten(1)
        )
        return self.regressor(features).squeeze(1)

    def forward(
        self, images: torch.Tensor, domain: DomainName, *, sample: bool = True, decode: bool = True
    ) -> TwinOutput:
        """One domain's pass. ``sample`` draws z (training); otherwise z = mu (deterministic)."""
        mu, logvar = self.encode(images, domain)
        z = self.reparameterize(mu, logvar) if sample else mu
        recon = self.decode(z, domain) if decode else None
        return TwinOutput(mu=mu, logvar=logvar, z=z, count=self.regress(mu), recon=recon)

    @torch.no_grad()
    def count(self, images: torch.Tensor, domain: DomainName = "natural") -> torch.Tensor:
        """Deterministic counts (N,) for images (N, 1, 128, 128) in [0, 1]; uses mu."""
        return self.regress(self.encode(images, domain)[0])

    @torch.no_grad()
    def translate(
        self, images: torch.Tensor, source: DomainName, target: DomainName
    ) -> torch.Tensor:
        """Encode in ``source`` and decode as ``target`` (e.g. natural -> synthetic look)."""
        return self.decode(self.encode(images, source)[0], target)

    def counting_network(
        self, domain: DomainName = "natural", with_mu: bool = False
    ) -> CountingNetwork:
        """The deterministic encoder + regressor path of one domain (shares its modules)."""
        encoder = self.encoders[domain]
        assert isinstance(encoder, OuterEncoder)
        shared_decoder = self.shared_decoder if self.config.regressor_input != "latent" else None
        return CountingNetwork(
            encoder, self.shared_encoder, self.regressor, shared_decoder, with_mu
        )


def _orthogonal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.orthogonal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def set_trainable(modules: list[nn.Module], trainable: bool) -> None:
    """Freeze or unfreeze modules; frozen modules also stay in eval mode (BatchNorm, dropout)."""
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(trainable)
