"""On-disk cache of decoded images (.npz, never pickled), keyed by file identity and options.

The key hashes every file's absolute path, size, mtime and ctime (nanoseconds) together with the
reader options and decoder versions, so any change to a file yields a new key: a stale entry
can never be returned, it is simply not found again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import tifffile

from twinvae.errors import TwinVAEWarning

CACHE_FORMAT_VERSION = 1


@dataclass
class DecodedImages:
    """Decoded images in input order; reasons[i] is "" when image i decoded, else why not."""

    images: np.ndarray
    reasons: list[str]


def cache_key(paths: Sequence[Path], options: dict[str, Any]) -> str:
    """Hash of every file's identity (path, size, mtime, ctime) and of the output options."""
    files: list[list[object]] = []
    for path in paths:
        absolute = os.path.abspath(path)
        try:
            stat = os.stat(absolute)
        except OSError:
            files.append([absolute, None])
            continue
        files.append([absolute, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns])
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "pillow": PIL.__version__,
        "tifffile": tifffile.__version__,
        "options": options,
        "files": files,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"decoded-{key}.npz"


def load_cached(cache_dir: Path, key: str, paths: Sequence[Path]) -> DecodedImages | None:
    """The cached decode for this key, or None when absent or unusable (never unpickles)."""
    file = cache_file(cache_dir, key)
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as stored:
            images = stored["images"]
            reasons = [str(reason) for reason in stored["reasons"]]
            stored_paths = [str(path) for path in stored["paths"]]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    expected_paths = [os.path.abspath(path) for path in paths]
    if (
        stored_paths != expected_paths
        or images.dtype != np.uint8
        or images.ndim != 3
        or len(images) != len(paths)
        or len(reasons) != len(paths)
    ):
        return None
    return DecodedImages(images=images, reasons=reasons)


def store_cached(cache_dir: Path, key: str, paths: Sequence[Path], decoded: DecodedImages) -> None:
    """Write the entry atomically; a cache that cannot be written only costs a warning."""
    cache_dir = Path(cache_dir)
    temporary: str | None = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=cache_dir, prefix=".decoded-", suffix=".tmp", delete=False
        ) as handle:
            temporary = handle.name
            np.savez(
                handle,
                images=decoded.images,
                reasons=np.array(decoded.reasons, dtype=str),
                paths=np.array([os.path.abspath(path) for path in paths], dtype=str),
            )
        os.replace(temporary, cache_file(cache_dir, key))
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        warnings.warn(
            TwinVAEWarning(f"could not write the image cache in {cache_dir}: {error}"), stacklevel=3
        )
