"""Device selection and DDP on the gloo backend with two CPU processes."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from twinvae.config import TrainConfig
from twinvae.errors import ConfigError
from twinvae.training.device import select_device, select_precision


def test_auto_device_is_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA"):
        select_device("cuda")


def test_auto_device_prefers_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("auto", local_rank=3) == torch.device("cuda", 1)


def test_precision_choice() -> None:
    assert select_precision("auto", torch.device("cuda", 0)) == "fp16"
    assert select_precision("auto", torch.device("cpu")) in {"fp32", "bf16"}
    with pytest.raises(ConfigError, match="fp16"):
        select_precision("fp16", torch.device("cpu"))
    assert TrainConfig().precision == "auto"


_FAULTS_OF_REPEATED_BUFFERS = """
import resource, torch
from twinvae.cli.process import keep_freed_memory
print(keep_freed_memory())
for _ in range(24):  # 48 MB: by default glibc maps (and page-faults) it afresh every time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(48 << 18).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's malloc")
def test_freed_memory_is_kept_for_reuse() -> None:
    """In fresh processes (the heap of this one depends on the tests before)."""
    faults = {}
    for setting in ("1", "0"):
        env = {**os.environ, "TWINVAE_KEEP_FREED_MEMORY": setting}
        result = subprocess.run(
            [sys.executable, "-c", _FAULTS_OF_REPEATED_BUFFERS],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        applied, *counts = result.stdout.split()
        assert applied == ("True" if setting == "1" else "False")
        faults[setting] = [int(count) for count in counts]
    # a fresh 48 MB buffer costs ~12,000 faults; the kept heap needs up to ~10 rounds to grow
    assert max(faults["1"][-4:]) < 1000, faults
    assert min(faults["0"][-4:]) > 5000, faults


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from test_training import _config, _image_set
    from twinvae.training.data import TrainingData
    from twinvae.training.trainer import Trainer

    data = TrainingData(
        _image_set(32, 0, labelled_share=0.5),
        _image_set(8, 1),
        _image_set(32, 2, "synthetic"),
        None,
    )
    trainer = Trainer(
        _config(train={"epochs": 2, "steps_per_epoch": 2}),
        Path(out) / "run",
        data=data,
        progress=False,
    )
    trainer.fit()
    torch.save(trainer.model.state_dict(), Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_gloo_two_processes_stay_in_sync(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name, tensor in rank0.items():
        if "running_" in name or "num_batches" in name:
            continue  # BatchNorm statistics are per process in plain DDP
        torch.testing.assert_close(tensor, rank1[name], msg=f"{name} differs between ranks")
    run = tmp_path / "run"
    assert (run / "last.pt").is_file() and (run / "metrics.csv").is_file()
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3
