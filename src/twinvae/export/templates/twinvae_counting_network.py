"""Standalone Twin-VAE cell-counting network (natural path) for bioimage.io bundles.

This file does not import twinvae: bioimage.io tools build the network from it with the
kwargs in rdf.yaml and load the bundled state dict. It mirrors the module layout of
``twinvae.models.twin_vae.CountingNetwork`` so that state-dict keys match exactly:

    encoder         4 x (Conv2d k5 s2, LeakyReLU, Dropout)   128 -> 62 -> 29 -> 13 -> 5 px
    shared_encoder  Conv2d k5 s2 (5 -> 1 px), fc_mu, fc_logvar
    shared_decoder  only when regressor_input == "shared_decoder"
    regressor       MLP mu -> count

With ``standardize_input`` each image is first brought to zero mean and unit variance (as in
``twinvae.models.twin_vae.standardize_images``).

Input: (N, 1, 128, 128) float32 images scaled to [0, 1]. Output: (N, 1) counts, plus mu
(N, latent_dim) when ``with_mu`` is set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_block(c_in: int, c_out: int, leaky_slope: float, dropout: float) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=5, stride=2),
        nn.LeakyReLU(leaky_slope),
        nn.Dropout(dropout),
    ]


class _SharedEncoder(nn.Module):
    def __init__(self, channels: int, latent_dim: int, leaky_slope: float, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *_conv_block(8 * channels, 16 * channels, leaky_slope, dropout), nn.Flatten()
        )
        self.fc_mu = nn.Linear(16 * channels, latent_dim)
        self.fc_logvar = nn.Linear(16 * channels, latent_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc_mu(self.conv(features))


class _SharedDecoder(nn.Module):
    def __init__(self, channels: int, latent_dim: int, leaky_slope: float) -> None:
        super().__init__()
        self.fc = nn.Linear(latent_dim, 16 * channels)
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(16 * channels, 8 * channels, kernel_size=5, stride=2),
            nn.BatchNorm2d(8 * channels),
            nn.LeakyReLU(leaky_slope),
        )
        self._channels = 16 * channels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, self._channels, 1, 1))


class TwinVAECountingNetwork(nn.Module):
    """Images (N, 1, 128, 128) in [0, 1] -> counts (N, 1) [, mu (N, latent_dim)]."""

    def __init__(
        self,
        base_channels: int = 32,
        latent_dim: int = 256,
        regressor_hidden: Sequence[int] = (256, 128),
        dropout: float = 0.1,
        leaky_slope: float = 0.2,
        regressor_input: str = "latent",
        standardize_input: bool = False,
        with_mu: bool = False,
    ) -> None:
        super().__init__()
        if regressor_input not in ("latent", "shared_decoder"):
            raise ValueError(
                f"regressor_input must be 'latent' or 'shared_decoder', got {regressor_input!r}"
            )
        c = base_channels
        self.encoder = nn.Sequential(
            *_conv_block(1, c, leaky_slope, dropout),
            *_conv_block(c, 2 * c, leaky_slope, dropout),
            *_conv_block(2 * c, 4 * c, leaky_slope, dropout),
            *_conv_block(4 * c, 8 * c, leaky_slope, dropout),
        )
        self.shared_encoder = _SharedEncoder(c, latent_dim, leaky_slope, dropout)
        self.shared_decoder = (
            _SharedDecoder(c, latent_dim, leaky_slope)
            if regressor_input == "shared_decoder"
            else None
        )
        layers: list[nn.Module] = []
        width = latent_dim if regressor_input == "latent" else 8 * c * 25
        for hidden in regressor_hidden:
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(leaky_slope), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.regressor = nn.Sequential(*layers)
        self.standardize_input = standardize_input
        self.with_mu = with_mu
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.standardize_input:
            centred = images - images.mean(dim=(1, 2, 3), keepdim=True)
            images = centred * torch.rsqrt(
                centred.square().mean(dim=(1, 2, 3), keepdim=True) + 1e-4
            )
        mu = self.shared_encoder(self.encoder(images))
        features = mu if self.shared_decoder is None else self.shared_decoder(mu).flatten(1)
        count = self.regressor(features)
        return (count, mu) if self.with_mu else count
