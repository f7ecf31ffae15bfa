"""Neural networks of twinvae as the papers draw them: plain `nn.Module`s, independent of the
training loop and of the CPU acceleration (`twinvae.accel`)."""

from twinvae.models.counting_network import CountingNetwork, TwinVAECountingNetwork
from twinvae.models.twin_vae import ModelConfig, TwinOutput, TwinVAE

__all__ = ["CountingNetwork", "ModelConfig", "TwinOutput", "TwinVAE", "TwinVAECountingNetwork"]
