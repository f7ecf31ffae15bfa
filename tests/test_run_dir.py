"""RunDirectory: one writer per run folder, stale temporaries, leftovers, unique default names."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from twinvae.errors import CheckpointError, ConfigError
from twinvae.training.errors import TrainingWarning
from twinvae.training.run_dir import (
    LOCK_NAME,
    RunDirectory,
    RunDirectoryInUseError,
    default_run_dir,
)


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunDirectory.new(run) as held:
        (held.last_checkpoint).write_bytes(b"x")  # resumable, so only the lock can refuse
        with pytest.raises(RunDirectoryInUseError, match=rf"pid {os.getpid()}\b"):
            RunDirectory.resume(run)
        with pytest.raises(RunDirectoryInUseError, match="in use"):
            RunDirectory.new(run)
    with RunDirectory.resume(run):  # released on exit
        pass
    assert not (run / LOCK_NAME).exists()  # a finished run keeps only its own files


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    """A killed training (SIGKILL: no clean-up runs) leaves no lock behind: the OS drops it."""
    run = tmp_path / "run"
    holder = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from twinvae.training.run_dir import RunDirectory
        run = RunDirectory.new(Path(sys.argv[1]))
        run.last_checkpoint.write_bytes(b"x")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", holder, str(run)], check=False)
    assert result.returncode == -9
    assert (run / LOCK_NAME).exists()  # the file stays, the lock does not
    with RunDirectory.resume(run) as resumed:
        assert resumed.last_checkpoint.read_bytes() == b"x"


def test_a_terminated_command_cleans_up_like_an_interrupted_one(tmp_path: Path) -> None:
    """`kill PID` (SIGTERM: timeout, batch schedulers) during the first epoch of a `twinvae`
    command removes the run folder, as Ctrl-C does; it is no dead folder that neither a new
    run nor --resume accepts."""
    run = tmp_path / "runs" / "a"
    command = textwrap.dedent(
        """
        import os, signal, sys, time
        from pathlib import Path
        import twinvae.cli.main as cli
        from twinvae.training.run_dir import RunDirectory

        def training_killed_in_its_first_epoch():
            with RunDirectory.new(Path(sys.argv[1])) as run:
                run.config_path.write_text("name: x\\n")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # as a training step would, until the signal stops it

        cli.app = training_killed_in_its_first_epoch
        cli.main()
        """
    )
    result = subprocess.run([sys.executable, "-c", command, str(run)], check=False, timeout=60)
    assert result.returncode == 128 + signal.SIGTERM
    assert not (tmp_path / "runs").exists()


def test_taking_the_lock_removes_stale_temporary_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    stale = [run / ".last.pt.k2j4d.tmp", run / ".best.pt.9sd1.tmp", run / ".config.yaml.a.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    foreign = run / ".notes.txt.tmp"
    foreign.write_text("not ours")
    with RunDirectory.resume(run):
        assert not any(path.exists() for path in stale)
        assert foreign.read_text() == "not ours"


def test_resume_needs_a_last_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no last\.pt"):
        RunDirectory.resume(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        RunDirectory.resume(tmp_path / "missing")


def test_a_new_run_refuses_a_folder_with_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        RunDirectory.new(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"notes.txt"}


def test_a_failed_run_removes_what_it_created(tmp_path: Path) -> None:
    created = tmp_path / "runs" / "a"
    with pytest.raises(RuntimeError), RunDirectory.new(created) as run:
        run.metrics_path.write_text("epoch\n")
        (run.path / ".last.pt.x.tmp").write_bytes(b"half")
        raise RuntimeError("data not found")
    assert not (tmp_path / "runs").exists()  # the parent it made goes too

    given = tmp_path / "given"
    given.mkdir()
    with pytest.raises(RuntimeError), RunDirectory.new(given) as run:
        run.config_path.write_text("name: x\n")
        raise RuntimeError("data not found")
    assert given.is_dir() and not any(given.iterdir())  # the user's folder stays

    kept = tmp_path / "kept"
    with pytest.raises(KeyboardInterrupt), RunDirectory.new(kept) as run:
        run.last_checkpoint.write_bytes(b"x")  # a checkpoint: resumable, keep everything
        run.metrics_path.write_text("epoch\n1\n")
        raise KeyboardInterrupt
    assert {p.name for p in kept.iterdir()} == {"last.pt", "metrics.csv"}


def test_default_run_folders_are_unique(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "strftime", lambda *_: "20250101-000000")  # one second
    first = default_run_dir("quick-cpu", tmp_path)
    first.mkdir()
    names = {default_run_dir("quick-cpu", tmp_path) for _ in range(20)}
    assert first not in names and len(names) == 20
    assert all(
        p.parent == tmp_path and p.name.startswith("quick-cpu-20250101-000000") for p in names
    )


def test_a_run_directory_dropped_without_close_releases_its_lock(tmp_path: Path) -> None:
    run = RunDirectory.new(tmp_path / "run")
    del run
    gc.collect()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunDirectory.new(tmp_path / "run").close()


def test_a_file_system_without_locks_is_used_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(handle: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with (
        pytest.warns(TrainingWarning, match="cannot lock files"),
        RunDirectory.new(tmp_path / "run"),
    ):
        assert not (tmp_path / "run" / LOCK_NAME).exists()
    with (
        pytest.raises(RuntimeError),
        pytest.warns(TrainingWarning),
        RunDirectory.new(tmp_path / "failed"),
    ):
        raise RuntimeError("clean-up still works")
    assert not (tmp_path / "failed").exists()
