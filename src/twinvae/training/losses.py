"""The twin loss (paper Eq. 1): per domain C_rec * Rec + C_reg * Reg + C_KL * KL."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twinvae.config import LossConfig
from twinvae.models.twin_vae import TwinOutput


@dataclass
class DomainLoss:
    """The weighted total and the unweighted terms of one domain (for logging)."""

    total: torch.Tensor
    rec: torch.Tensor
    reg: torch.Tensor
    kl: torch.Tensor


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over pixels and images; BCE in fp32 (autocast makes it unsafe in half precision)."""
    if kind == "bce":
        return F.binary_cross_entropy(recon.float().clamp(1e-6, 1 - 1e-6), target.float())
    return F.mse_loss(recon.float(), target.float())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)), averaged over images and latent dimensions."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())


# below this predicted count the Poisson deviance continues as its quadratic Taylor expansion
# (it has a pole at 0, and the regressor's output is unbounded)
POISSON_FLOOR = 0.25


def poisson_deviance(predicted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per image 2 (y log(y / p) - (y - p)): 0 at p = y, gradient 2 (1 - y / p), i.e. squared
    errors weighted by about 1 / count; smooth and convex also for p <= `POISSON_FLOOR`."""
    floor = POISSON_FLOOR
    safe = predicted.clamp(min=floor)
    deviance = 2 * (counts * torch.log(counts / safe) - (counts - safe))
    below = predicted - floor  # <= 0 where the expansion applies
    slope = 2 * (1 - counts / floor)
    curvature = 2 * counts / floor**2
    extended = deviance + slope * below + 0.5 * curvature * below.square()
    return torch.where(predicted < floor, extended, deviance)


def regression_loss(
    predicted: torch.Tensor, targets: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """Mean error over labelled images only (count > 0); unlabelled images neither add nor
    dilute. ``targets`` is (N,) counts, or (N, 2) counts and loss weights (pseudo-labels);
    ``kind`` is ``mse`` or ``poisson`` (`poisson_deviance`)."""
    counts, weights = (targets[:, 0], targets[:, 1]) if targets.dim() == 2 else (targets, None)
    labelled = counts > 0
    if not bool(labelled.any()):
        return predicted.sum() * 0.0  # keeps the graph (DDP needs every output used)
    chosen, truth = predicted.float()[labelled], counts.float()[labelled]
    if kind == "poisson":
        errors = poisson_deviance(chosen, truth)
    elif kind == "mse":
        if weights is None:
            return F.mse_loss(chosen, truth)
        errors = (chosen - truth).square()
    else:
        raise ValueError(f"regression loss {kind!r}: expected mse or poisson")
    if weights is not None:
        errors = errors * weights.float()[labelled]
    return errors.mean()


def twin_domain_loss(
    output: TwinOutput,
    images: torch.Tensor,
    counts: torch.Tensor,
    config: LossConfig,
    *,
    rec_weight: float,
    regressor_on: bool,
) -> DomainLoss:
    """Loss of one domain; ``rec_weight`` is C_rec after decay (0 skips the term)."""
    zero = output.mu.new_zeros((), dtype=torch.float32)
    rec = zero
    if output.recon is not None and rec_weight > 0:
        rec = reconstruction_loss(output.recon, images, config.reconstruction)
    reg = regression_loss(output.count, counts, config.regression) if regressor_on else zero
    kl = kl_divergence(output.mu, output.logvar) if config.kl_weight > 0 else zero
    total = rec_weight * rec + config.kl_weight * kl
    if regressor_on:
        total = total + config.reg_weight * reg
    return DomainLoss(total=total, rec=rec.detach(), reg=reg.detach(), kl=kl.detach())
