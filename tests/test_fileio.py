"""Atomic writes: whole files or none, never a silent overwrite, the usual permissions."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from twinvae.fileio import atomic_writer, default_file_mode


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writer_gives_the_permissions_of_a_plain_new_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = tmp_path / "sub" / "atomic.txt"
    with atomic_writer(target) as stream:
        stream.write("hello\n")
    assert target.read_text() == "hello\n"
    assert _mode(target) == _mode(plain) == default_file_mode()


def test_atomic_writer_leaves_nothing_behind_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(target, binary=True) as stream:
        stream.write(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_writer_without_replace_never_touches_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "counts.csv"
    target.write_text("mine")
    with pytest.raises(FileExistsError), atomic_writer(target, replace=False) as stream:
        stream.write("new")
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.csv"]
    fresh = tmp_path / "fresh.csv"
    with atomic_writer(fresh, replace=False) as stream:
        stream.write("new")
    assert fresh.read_text() == "new"
