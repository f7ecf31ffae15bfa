"""Process-wide settings: library calls leave them as they found them; only the twinvae command
tunes glibc's malloc (irreversible) for its own process."""

from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from test_reference_numbers import _config, _data
from twinvae.training.trainer import train


class _RecordedMallopt:
    """Stands in for glibc's mallopt: records the calls."""

    argtypes: Any = None
    restype: Any = None

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return 1


@pytest.fixture
def mallopt(monkeypatch: pytest.MonkeyPatch) -> _RecordedMallopt:
    """Every ``ctypes.CDLL(None).mallopt`` (the process's own malloc) is recorded, not made."""
    recorded = _RecordedMallopt()
    real = ctypes.CDLL

    class _Process:
        def __init__(self) -> None:
            self.mallopt = recorded

    def cdll(name: str | None, *args: Any, **kwargs: Any) -> Any:
        return _Process() if name is None else real(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.delenv("TWINVAE_KEEP_FREED_MEMORY", raising=False)
    return recorded


def test_a_library_train_call_leaves_the_thread_count_and_malloc_as_it_found_them(
    tmp_path: Path, mallopt: _RecordedMallopt
) -> None:
    config = _config("fp32")
    settings = config.train.model_copy(update={"epochs": 1, "num_threads": 2})
    config = config.model_copy(update={"train": settings})
    before = torch.get_num_threads()
    assert before != 2  # the suite runs on one thread (conftest)
    during: list[int] = []
    hook = register_optimizer_step_pre_hook(lambda *_: during.append(torch.get_num_threads()))
    try:
        train(config, tmp_path / "run", data=_data(), progress=False)
    finally:
        hook.remove()
    assert during == [2]  # the run's setting held while it trained
    assert torch.get_num_threads() == before
    assert mallopt.calls == []


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's malloc")
def test_the_command_keeps_freed_memory_for_its_process(
    monkeypatch: pytest.MonkeyPatch, mallopt: _RecordedMallopt
) -> None:
    from twinvae.cli.main import main

    monkeypatch.setattr(sys, "argv", ["twinvae", "--version"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert sorted(mallopt.calls) == [(-3, 1 << 30), (-1, 1 << 30)]  # mmap, trim thresholds
