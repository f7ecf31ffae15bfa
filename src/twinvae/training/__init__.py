"""Training: twin loss, trainer, transfer strategies, checkpoints."""
