"""twinvae: Twin-VAE cell counting for bright-field and phase-contrast microscopy."""

__version__ = "0.1.0"
