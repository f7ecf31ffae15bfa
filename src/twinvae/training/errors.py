"""Errors and warnings of the training loop (the CLI shows them as one line each)."""

from __future__ import annotations

from twinvae.errors import TwinVAEError, TwinVAEWarning


class TrainingDivergedError(TwinVAEError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class RunDirectoryInUseError(TwinVAEError):
    """Another process is writing the run folder (it holds the folder's lock)."""


class TrainingWarning(TwinVAEWarning):
    """A run trains, but something about it deserves attention (a tiny validation split, a
    resume on another runtime)."""
