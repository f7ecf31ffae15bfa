"""Neural networks of twinvae: plain `nn.Module`s, independent of the training loop."""

from twinvae.models.twin_vae import CountingNetwork, ModelConfig, TwinOutput, TwinVAE

__all__ = ["CountingNetwork", "ModelConfig", "TwinOutput", "TwinVAE"]
