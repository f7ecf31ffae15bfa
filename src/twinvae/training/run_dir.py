"""The run folder: its files, one writer at a time, clean-up after failures, checkpoints.

Layout::

    RUN/config.yaml   the run's config (rewritten when a resume extends it)
    RUN/metrics.csv   one row per epoch (`MetricsLog`)
    RUN/last.pt       the whole training state after the latest epoch; --resume reads it
    RUN/best.pt       the best validated epoch: weights, config, epoch, metrics (no optimizer)
    RUN/.lock         locked (flock) by the one process writing the run; removed when it ends

The lock lives as long as the `RunDirectory` is open. The OS drops it when the holder dies, so
a killed run never blocks its own resume; a second writer is refused at once, with the
holder's pid.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import socket
import time
import warnings
import weakref
from pathlib import Path
from types import TracebackType

from twinvae.config import ExperimentConfig
from twinvae.errors import CheckpointError, ConfigError
from twinvae.fileio import atomic_writer
from twinvae.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from twinvae.training.errors import RunDirectoryInUseError, TrainingWarning

LOCK_NAME = ".lock"
CONFIG_NAME, METRICS_NAME, LAST_NAME, BEST_NAME = "config.yaml", "metrics.csv", "last.pt", "best.pt"
RUN_FILES = (CONFIG_NAME, METRICS_NAME, LAST_NAME, BEST_NAME)
# flock's errors on file systems that do not support it (some network and FUSE mounts)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}

__all__ = [
    "LOCK_NAME",
    "RUN_FILES",
    "RunDirectory",
    "RunDirectoryInUseError",
    "default_run_dir",
    "is_writer_process",
]


def is_writer_process() -> bool:
    """Whether this process writes run folders: rank 0 of a DDP run (read as `setup_runtime`
    reads it), or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """``runs/<name>-<date>-<time>-<4 hex digits>``: a folder that does not exist yet, also
    when several runs start in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    while True:
        candidate = root / f"{name}-{stamp}-{secrets.token_hex(2)}"
        if not candidate.exists():
            return candidate


def _release_lock(handle: int, lock_path: Path) -> None:
    try:
        lock_path.unlink(missing_ok=True)  # while still locked (see RunDirectory._lock_folder)
    finally:
        os.close(handle)


class RunDirectory:
    """One run folder, opened by `new` (a fresh run) or `resume`, closed by `close` (or as a
    context manager). Only a ``writer`` (in DDP: rank 0) creates, locks or writes anything."""

    def __init__(self, path: Path, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self._lock: weakref.finalize | None = None
        self._open = False  # locked, or taken without a lock where flock is not supported
        self._made: list[Path] = []  # folders `new` created, innermost first

    # ---- layout ---------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def last_checkpoint(self) -> Path:
        return self.path / LAST_NAME

    @property
    def best_checkpoint(self) -> Path:
        return self.path / BEST_NAME

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    # ---- opening and closing --------------------------------------------------------------

    @classmethod
    def new(cls, path: Path, *, writer: bool = True) -> RunDirectory:
        """Create (or take an empty) folder for a new run and lock it."""
        run = cls(path, writer=writer)
        if not writer:
            return run
        missing = [p for p in (run.path, *run.path.parents) if not p.exists()]
        if run.path.exists() and not run.path.is_dir():
            raise ConfigError(f"{run.path}: exists and is not a folder; choose another --out")
        run.path.mkdir(parents=True, exist_ok=True)
        run._lock_folder()  # refused: the folder is someone else's, so nothing is removed
        run._made = missing
        try:
            run._remove_stale_temporaries()
            if any(p.name != LOCK_NAME for p in run.path.iterdir()):
                raise ConfigError(
                    f"{run.path}: run folder exists and is not empty; use --resume to continue "
                    "it or choose another --out"
                )
        except BaseException:
            run._made = []
            run._unlock()
            raise
        return run

    @classmethod
    def resume(cls, path: Path, *, writer: bool = True) -> RunDirectory:
        """Lock the folder of an existing run that has a last.pt to resume from."""
        run = cls(path, writer=writer)
        if not run.path.is_dir():
            raise CheckpointError(f"{run.path}: run folder not found")
        if writer:
            run._lock_folder()
        if not run.last_checkpoint.is_file():
            run._unlock()
            raise CheckpointError(f"{run.path}: nothing to resume (no {LAST_NAME})")
        if writer:
            run._remove_stale_temporaries()
        return run

    @classmethod
    def locked(cls, path: Path) -> RunDirectory:
        """Lock an existing folder without looking at its files, for code that clears a run
        folder; a folder another process is writing is refused (`RunDirectoryInUseError`).
        Release it with ``close()``."""
        run = cls(path)
        run._lock_folder()
        return run

    def close(self, *, failed: bool = False) -> None:
        """Release the lock. After a failure before the first checkpoint nothing in the folder
        is of use: remove what this run wrote, and the folders `new` created."""
        if not self._open:
            return
        if failed and not self.last_checkpoint.exists():
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            self._remove_stale_temporaries()
        self._unlock()
        if failed and not self.last_checkpoint.exists():
            for folder in self._made:
                try:
                    folder.rmdir()
                except OSError:  # not empty (or not ours any more): keep it and its parents
                    break
        self._made = []

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close(failed=error is not None)

    # ---- files ----------------------------------------------------------------------------

    def load_last(self) -> Checkpoint:
        return load_checkpoint(self.last_checkpoint)

    def write_config(self, config: ExperimentConfig) -> None:
        with atomic_writer(self.config_path) as stream:
            stream.write(config.to_yaml())

    def save_checkpoints(self, checkpoint: Checkpoint, *, best: bool) -> None:
        """last.pt with everything a resume needs; best.pt, when this epoch is the best so far,
        with only what evaluation, export and transfer read (`Checkpoint.for_inference`)."""
        save_checkpoint(checkpoint, self.last_checkpoint)
        if best:
            save_checkpoint(checkpoint.for_inference(), self.best_checkpoint)

    # ---- the lock -------------------------------------------------------------------------

    def _lock_folder(self) -> None:
        while True:
            handle = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(handle, 200).decode("utf-8", "replace").strip()
                os.close(handle)
                raise RunDirectoryInUseError(
                    f"{self.path}: run folder is in use by another twinvae process "
                    f"({holder or 'unknown pid'}); wait until it ends, or choose another --out"
                ) from None
            except OSError as error:
                os.close(handle)
                if error.errno not in _NO_FLOCK:
                    raise
                self.lock_path.unlink(missing_ok=True)
                warnings.warn(
                    TrainingWarning(
                        f"{self.path}: its file system cannot lock files ({error.strerror}); "
                        "nothing stops a second twinvae process from writing this run folder"
                    ),
                    stacklevel=3,
                )
                self._open = True
                return
            except BaseException:
                os.close(handle)
                raise
            # the previous holder removes the file as it unlocks: if that happened between our
            # open and our flock, we hold a file nobody else sees; lock the new one instead
            try:
                current = os.stat(self.lock_path).st_ino == os.fstat(handle).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(handle)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n"
        os.ftruncate(handle, 0)
        os.write(handle, holder.encode())
        # released by close(), or when this object is collected without one
        self._lock = weakref.finalize(self, _release_lock, handle, self.lock_path)
        self._open = True

    def _unlock(self) -> None:
        self._open = False
        lock, self._lock = self._lock, None
        if lock is not None:
            lock()

    def _remove_stale_temporaries(self) -> None:
        """`atomic_writer` files of a write that was killed (only ever ours: we hold the lock)."""
        for name in RUN_FILES:
            for stale in self.path.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
