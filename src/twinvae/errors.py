"""Exceptions and warnings of twinvae.

The CLI turns the exceptions into one readable line and exit code 1, and shows the warnings
(`TwinVAEWarning`) as one "Warning:" line each, without Python's source location.
"""


class TwinVAEError(Exception):
    """Base class for errors caused by user input (files, configs, options)."""


class DataError(TwinVAEError):
    """An image, CSV row or folder is missing, unreadable or not what was expected."""


class ConfigError(TwinVAEError):
    """A configuration file or override is invalid."""


class CheckpointError(TwinVAEError):
    """A checkpoint is missing, unreadable or incompatible."""


class ExportError(TwinVAEError):
    """A bundle could not be built or failed validation."""


class TwinVAEWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. skipped inputs)."""


class SkippedInputWarning(TwinVAEWarning):
    """Inputs were skipped because of skip_bad=True; the message lists every one and why."""
