"""Exceptions raised by twinvae; the CLI turns them into one readable line and exit code 1."""


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
