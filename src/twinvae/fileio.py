"""Small file helpers shared across subpackages."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def make_readable_like_new_file(path: Path) -> None:
    """Give ``path`` the usual permissions (temporary-file helpers create files as 0600)."""
    os.chmod(path, default_file_mode())


@contextmanager
def atomic_writer(path: Path, *, binary: bool = False, replace: bool = True) -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary file in the same folder, fsynced, then renamed.

    A kill never leaves half a file, and the file gets the usual permissions. With
    ``replace=False`` an existing ``path`` is never touched: FileExistsError is raised instead.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if binary:
            stream: IO[Any] = os.fdopen(handle, "wb")
        else:
            stream = os.fdopen(handle, "w", encoding="utf-8", newline="")
        with stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        make_readable_like_new_file(Path(temporary))
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if path exists, unlike a rename
            os.unlink(temporary)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
