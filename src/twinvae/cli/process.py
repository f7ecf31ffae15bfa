"""Process-wide settings that the twinvae command makes for its own process.

They cannot be undone, so library calls never make them: inside KNIME's Python process or a
notebook they would change the host's process. This module imports no torch (the command line
starts without it).
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters of glibc's malloc.h
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory (up to 1 GiB) for reuse by this process.

    A training step allocates and frees the same large activation buffers every time. By
    default glibc maps buffers above 32 MB freshly from the OS and returns free heap above
    64 MB, so every step page-faults tens of megabytes in again (~20,000 faults per CPU step
    of the paper-size model, a few % of its time). Process-wide, irreversible and only with
    glibc: made by the twinvae command for its own process, never by library calls (inside
    KNIME's Python or a notebook it would change the host's process). Off with
    ``TWINVAE_KEEP_FREED_MEMORY=0``. Returns whether the setting was applied.
    """
    if os.environ.get("TWINVAE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [mallopt(option, _KEEP_BYTES) for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)]
    return all(result == 1 for result in applied)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """While the block runs, SIGTERM (`kill PID`, `timeout`, batch schedulers) ends the command
    as Ctrl-C does.

    By default SIGTERM ends Python at once, so no clean-up runs: a run stopped before its
    first checkpoint kept a folder that neither a new run nor --resume accepts. The handler
    raises SystemExit (exit code 143) in the main thread instead, so open run folders are
    cleaned up and unlocked on the way out; a second SIGTERM during that clean-up ends the
    process at once. A SIGTERM that the parent set to be ignored (or handles) is left alone,
    and the previous handler is back when the block ends.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
