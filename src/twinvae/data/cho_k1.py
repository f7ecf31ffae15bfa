"""Where the CHO-K1 data set is: the one place that answers it for configs, plans and commands.

The folder (holding bf/ and pc/) is given with ``--data-root`` (``data_root=``) or the
environment variable ``TWINVAE_CHO_K1``; nothing assumes a layout of the user's disk. Builtin
configs refer to the data set as ``cho-k1:<path inside it>`` (e.g. ``cho-k1:pc``), which is
replaced by the real path when the config is loaded, so a run's saved config records the folder
it actually read.
"""

from __future__ import annotations

import os
from pathlib import Path

from twinvae.errors import ConfigError, DataError

ENV_VAR = "TWINVAE_CHO_K1"
REFERENCE_PREFIX = "cho-k1:"

_HOW_TO_SET = (
    f"set {ENV_VAR}=/path/to/cho-k1 (the folder holding bf/ and pc/), pass --data-root PATH, "
    "or train on other images with --set data.natural=PATH"
)


def cho_k1_root(data_root: Path | str | None = None, needed_for: str = "") -> Path:
    """The CHO-K1 folder: ``data_root`` when given, else ``$TWINVAE_CHO_K1``; it must exist.

    ``needed_for`` names what asked (e.g. a config value) in the error when neither is set.
    """
    if data_root is not None and str(data_root).strip():
        root, origin = Path(data_root).expanduser(), f"--data-root {data_root}"
    else:
        configured = os.environ.get(ENV_VAR, "").strip()
        if not configured:
            asker = f"{needed_for} needs" if needed_for else "this needs"
            raise ConfigError(
                f"{asker} the CHO-K1 data folder, but {ENV_VAR} is not set: {_HOW_TO_SET}"
            )
        root, origin = Path(configured).expanduser(), f"{ENV_VAR}={configured}"
    if not root.is_dir():
        raise DataError(
            f"{origin}: folder not found; expected the CHO-K1 folder holding bf/ and pc/ "
            f"({_HOW_TO_SET})"
        )
    return root


def is_reference(value: str) -> bool:
    """Whether a path value is a ``cho-k1:...`` reference to the CHO-K1 data set."""
    return value.startswith(REFERENCE_PREFIX)


def resolve_reference(value: str, data_root: Path | str | None = None, what: str = "") -> str:
    """``cho-k1:pc`` -> ``<CHO-K1 root>/pc``; any other value is returned unchanged."""
    if not is_reference(value):
        return value
    inside = value[len(REFERENCE_PREFIX) :].strip("/")
    asker = f"{what} {value!r}" if what else repr(value)
    root = cho_k1_root(data_root, needed_for=asker)
    return str(root / inside) if inside else str(root)
