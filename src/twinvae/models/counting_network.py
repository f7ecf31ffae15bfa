"""The Twin-VAE's counting path: outer encoder -> shared encoder -> mu -> regressor -> count.

This file is the one definition of that path. ``twinvae.models.twin_vae`` builds the Twin-VAE
from its blocks, and bioimage.io bundles ship the file itself as ``twinvae_counting_network.py``:
it imports nothing but torch, and bioimage.io tools build ``TwinVAECountingNetwork`` from the
kwargs in rdf.yaml and load the bundled state dict into it. Layer sizes follow the authors'
reference implementation (Stallmann et al. 2021; Kenneweg, Stallmann, Hammer 2023), with
c = base_channels (32 in the papers):

    encoder         4 x (Conv2d k5 s2, LeakyReLU, Dropout)  128 -> 62 -> 29 -> 13 -> 5 px,
                    channels 1 -> c -> 2c -> 4c -> 8c
    shared_encoder  Conv2d k5 s2, LeakyReLU, Dropout        5 -> 1 px, 8c -> 16c;
                    fc_mu, fc_logvar 16c -> latent
    shared_decoder  fc latent -> 16c, ConvTranspose2d k5 s2, BatchNorm, LeakyReLU: 1 -> 5 px,
                    16c -> 8c (in the counting path only with regressor_input "shared_decoder")
    regressor       MLP -> 1 (raw count)

With ``standardize_input`` each image is first brought to zero mean and unit variance.
Input: (N, 1, 128, 128) float32 images scaled to [0, 1]. Output: (N, 1) counts, plus mu
(N, latent_dim) when ``with_mu`` is set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

FEATURE_SIZE = 5  # px: the side of the outer encoder's output for 128 x 128 images


def conv_block(c_in: int, c_out: int, leaky_slope: float, dropout: float) -> list[nn.Module]:
    """One encoder layer: Conv2d 5 x 5, stride 2, LeakyReLU, Dropout."""
    return [
        nn.Conv2d(c_in, c_out, kernel_size=5, stride=2),
        nn.LeakyReLU(leaky_slope),
        nn.Dropout(dropout),
    ]


def deconv_block(
    c_in: int, c_out: int, kernel: int, stride: int, leaky_slope: float
) -> list[nn.Module]:
    """One decoder layer: ConvTranspose2d, BatchNorm2d, LeakyReLU."""
    return [
        nn.ConvTranspose2d(c_in, c_out, kernel_size=kernel, stride=stride),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(leaky_slope),
    ]


def standardize_images(images: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Each image (N, C, H, W) at zero mean and unit variance; ``eps`` keeps flat images finite.

    Written with plain reductions so that it exports to ONNX as it is.
    """
    centred = images - images.mean(dim=(1, 2, 3), keepdim=True)
    variance = centred.square().mean(dim=(1, 2, 3), keepdim=True)
    return centred * torch.rsqrt(variance + eps)


class OuterEncoder(nn.Sequential):
    """Domain-specific outer encoder: (N, 1, 128, 128) -> (N, 8c, 5, 5)."""

    def __init__(
        self, channels: int, leaky_slope: float, dropout: float, standardize_input: bool = False
    ) -> None:
        c = channels
        super().__init__(
            *conv_block(1, c, leaky_slope, dropout),
            *conv_block(c, 2 * c, leaky_slope, dropout),
            *conv_block(2 * c, 4 * c, leaky_slope, dropout),
            *conv_block(4 * c, 8 * c, leaky_slope, dropout),
        )
        self.standardize_input = standardize_input

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(standardize_images(images) if self.standardize_input else images)


class SharedEncoder(nn.Module):
    """Shared inner encoder: (N, 8c, 5, 5) -> mu, logvar of shape (N, latent)."""

    def __init__(self, channels: int, latent_dim: int, leaky_slope: float, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *conv_block(8 * channels, 16 * channels, leaky_slope, dropout), nn.Flatten()
        )
        self.fc_mu = nn.Linear(16 * channels, latent_dim)
        self.fc_logvar = nn.Linear(16 * channels, latent_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.conv(features)
        return self.fc_mu(hidden), self.fc_logvar(hidden)


class SharedDecoder(nn.Module):
    """Shared inner decoder: (N, latent) -> (N, 8c, 5, 5)."""

    def __init__(self, channels: int, latent_dim: int, leaky_slope: float) -> None:
        super().__init__()
        self.fc = nn.Linear(latent_dim, 16 * channels)
        self.deconv = nn.Sequential(
            *deconv_block(16 * channels, 8 * channels, FEATURE_SIZE, 2, leaky_slope)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, self.fc.out_features, 1, 1))


class Regressor(nn.Sequential):
    """MLP from features to a raw (unbounded, linear) cell count: (N, in_features) -> (N, 1)."""

    def __init__(
        self, in_features: int, hidden: Sequence[int], leaky_slope: float, dropout: float
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.LeakyReLU(leaky_slope), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        super().__init__(*layers)

    @torch.no_grad()
    def start_at(self, count: float) -> None:
        """Set the output bias so that an untrained regressor predicts about ``count``.

        With the default init the first predictions are near 0, and the first hundreds of steps
        only move the mean; starting at the mean label skips that.
        """
        last = self[-1]
        assert isinstance(last, nn.Linear)
        last.bias.fill_(count)


def regressor_in_features(channels: int, latent_dim: int, regressor_input: str) -> int:
    """The regressor reads mu (``latent``) or the shared decoder's (8c, 5, 5) output."""
    if regressor_input not in ("latent", "shared_decoder"):
        raise ValueError(
            f"regressor_input must be 'latent' or 'shared_decoder', got {regressor_input!r}"
        )
    return latent_dim if regressor_input == "latent" else 8 * channels * FEATURE_SIZE**2


class CountingNetwork(nn.Module):
    """Outer encoder -> shared encoder -> mu [-> shared decoder] -> regressor; (N, 1, 128, 128)
    -> (N, 1) counts, and mu (N, latent) with ``with_mu``. Shares (does not copy) its modules."""

    def __init__(
        self,
        encoder: OuterEncoder,
        shared_encoder: SharedEncoder,
        regressor: Regressor,
        shared_decoder: SharedDecoder | None = None,
        with_mu: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.shared_encoder = shared_encoder
        self.regressor = regressor
        self.shared_decoder = shared_decoder
        self.with_mu = with_mu

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        mu, _ = self.shared_encoder(self.encoder(images))
        features = mu if self.shared_decoder is None else self.shared_decoder(mu).flatten(1)
        count = self.regressor(features)
        return (count, mu) if self.with_mu else count


class TwinVAECountingNetwork(CountingNetwork):
    """The counting network built from its sizes (the kwargs in rdf.yaml), in eval mode."""

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
        c = base_channels
        width = regressor_in_features(c, latent_dim, regressor_input)
        super().__init__(
            OuterEncoder(c, leaky_slope, dropout, standardize_input),
            SharedEncoder(c, latent_dim, leaky_slope, dropout),
            Regressor(width, regressor_hidden, leaky_slope, dropout),
            SharedDecoder(c, latent_dim, leaky_slope)
            if regressor_input == "shared_decoder"
            else None,
            with_mu,
        )
        self.eval()
