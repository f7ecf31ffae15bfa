"""benchmarks/gpu_check.py: its dry run (CPU, seconds) writes the GPU check's report with every
phase; the CHO-K1 cache it trains from; the time limits of its phases."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from conftest import chamber_rows, random_image, save_image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
PHASES = {"cuda_tests", "speed_cpu", "speed_device", "speed_device_compiled", "training"}
SPEED_PHASES = ("speed_cpu", "speed_device", "speed_device_compiled")


def _gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _gpu_check()


def _fake_cho_k1(root: Path, rows: list[tuple[str, int]]) -> Path:
    """A CHO-K1 root with pc/train.csv listing noise PNGs."""
    for index, (name, _) in enumerate(rows):
        save_image(root / "pc" / name, random_image(index))
    lines = [f"{name},{count}" for name, count in rows]
    (root / "pc" / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """--make-cache on a small fake CHO-K1 folder, then --dry-run from that cache (once)."""
    folder = tmp_path_factory.mktemp("gpu-check")
    rows = chamber_rows(chambers=3, frames=8)
    root = _fake_cho_k1(folder / "cho-k1", rows)
    cache = folder / "pc-train.npz"
    made = subprocess.run(
        [sys.executable, str(SCRIPT), "--make-cache", str(cache), "--data", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    out = folder / "report" / "check.json"
    command = [sys.executable, str(SCRIPT), "--dry-run", "--cache", str(cache), "--out", str(out)]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    assert ran.returncode == 0, (ran.stdout, ran.stderr, report.get("phases"))
    return {"report": report, "rows": rows, "out": out}


@pytest.mark.slow
def test_dry_run_report_names_the_hardware_and_every_phase(dry_run: dict[str, Any]) -> None:
    report = dry_run["report"]
    assert report["dry_run"] is True
    assert report["ok"] is True
    assert set(report["phases"]) == PHASES
    assert {phase["status"] for phase in report["phases"].values()} == {"ok"}
    hardware = report["hardware"]
    assert hardware["cpu"]["model"] and hardware["cpu"]["logical_cores"] >= 1
    assert hardware["torch"] == torch.__version__
    assert hardware["gpus"] == [] or torch.cuda.is_available()
    assert report["environment"]["TWINVAE_CPU_KERNELS"] in ("0", "1")
    assert 0 < report["seconds"] < report["budget_s"]
    work = dry_run["out"].parent / "check-work"  # the default work folder, beside --out
    assert (work / "logs" / "training.log").is_file()


@pytest.mark.slow
def test_dry_run_times_training_steps_eager_and_compiled(dry_run: dict[str, Any]) -> None:
    phases = dry_run["report"]["phases"]
    for name in SPEED_PHASES:
        speed = phases[name]
        assert speed["device"] == "cpu"
        assert speed["channels_last"] is True
        assert speed["compiled"] is (name == "speed_device_compiled")
        assert speed["steps"] >= 2
        images = speed["steps"] * 2 * speed["batch_per_domain"]
        assert speed["images_per_second"] == pytest.approx(
            images / speed["timed_seconds"], rel=0.01
        )
        assert math.isfinite(speed["last_loss"])
    assert phases["speed_device_compiled"]["backend"] == "eager"  # needs no C compiler
    summary = dry_run["report"]["summary"]
    ratio = (
        phases["speed_device_compiled"]["images_per_second"]
        / (phases["speed_cpu"]["images_per_second"])
    )
    assert summary["compiled_vs_cpu"] == pytest.approx(ratio, abs=0.01)


@pytest.mark.slow
def test_dry_run_trains_paper_pc_from_the_cache(dry_run: dict[str, Any]) -> None:
    training = dry_run["report"]["phases"]["training"]
    rows = dry_run["rows"]
    assert training["config"] == "paper-pc"
    assert training["data"]["images"] == len(rows)
    assert training["data"]["labelled"] == sum(1 for _, count in rows if count > 0)
    assert training["stopped_by"] == "time"
    assert training["epochs_completed"] == len(training["epochs"]) >= 1
    assert training["val_mae_last"] >= 0 and math.isfinite(training["val_mae_last"])
    assert training["val_mae_best"] <= training["val_mae_last"]
    assert dry_run["report"]["summary"]["val_mae_last"] == training["val_mae_last"]


@pytest.mark.slow
def test_dry_run_ran_the_cuda_marked_tests(dry_run: dict[str, Any]) -> None:
    tests = dry_run["report"]["phases"]["cuda_tests"]
    assert "tests/test_cuda.py" in tests["files"]
    assert tests["failed"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] >= 1 and tests["passed"] == 0


def _cached(names: list[str], seed: int = 0) -> Any:
    images = np.stack([random_image(seed + index) for index in range(len(names))])
    counts = np.arange(len(names), dtype=np.int16) % 3
    return gpu_check.CachedImages(images, counts, names, "pc", "train")


def test_cache_round_trip_and_unpacked_folder_reads_back(tmp_path: Path) -> None:
    from twinvae.data.readers import load_image_set

    names = [name for name, _ in chamber_rows(chambers=2, frames=3)]
    cached = _cached(names)
    path = tmp_path / "cache" / "pc-train.npz"
    gpu_check.write_cache(path, cached)
    loaded = gpu_check.read_cache(path)
    np.testing.assert_array_equal(loaded.images, cached.images)
    np.testing.assert_array_equal(loaded.counts, cached.counts)
    assert loaded.names == names and loaded.modality == "pc" and loaded.split == "train"

    folder = gpu_check.unpack_cache(loaded, tmp_path / "data", path)
    assert folder == tmp_path / "data" / "pc"
    read = load_image_set(folder, split="train", modality="pc")
    assert read.names == names  # the same relative paths, so the same chamber split
    np.testing.assert_array_equal(read.images, cached.images)
    np.testing.assert_array_equal(read.counts, cached.counts)


@pytest.mark.parametrize("name", ["../escape.png", "/tmp/absolute.png", "train/a,b.png"])
def test_cache_refuses_names_that_leave_the_folder(tmp_path: Path, name: str) -> None:
    path = tmp_path / "bad.npz"
    with pytest.raises(gpu_check.CheckError, match="not a safe relative path"):
        gpu_check.write_cache(path, _cached([name]))
    assert not path.exists()
    np.savez_compressed(  # as a hand-made or tampered cache would hold it
        path,
        format=np.array(gpu_check.CACHE_FORMAT),
        images=random_image(0)[None],
        counts=np.array([1], dtype=np.int16),
        names=np.array([name]),
        modality=np.array("pc"),
        split=np.array("train"),
    )
    with pytest.raises(gpu_check.CheckError, match=str(path)):
        gpu_check.read_cache(path)


def test_cache_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    missing, garbage, other = tmp_path / "missing.npz", tmp_path / "garbage.npz", tmp_path / "o.npz"
    garbage.write_bytes(b"not a zip file")
    np.savez(other, images=random_image(0)[None])
    for path in (missing, garbage, other):
        with pytest.raises(gpu_check.CheckError) as caught:
            gpu_check.read_cache(path)
        assert str(path) in str(caught.value) and "--make-cache" in str(caught.value)


def test_a_phase_over_its_time_limit_is_killed(tmp_path: Path) -> None:
    started = time.monotonic()
    child = gpu_check.run_child(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
        2.0,
        tmp_path / "logs" / "sleep.log",
    )
    assert child.returncode is None
    assert time.monotonic() - started < 60
    assert "started" in child.output_tail


def test_budget_keeps_time_for_the_later_phases() -> None:
    budget = gpu_check.Budget(100.0)
    assert 60.0 < budget.limit(90.0, reserve_after=30.0) <= 70.0
    assert budget.limit(10.0, reserve_after=30.0) == 10.0
    assert budget.limit(90.0, reserve_after=200.0) == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the full check")
def test_full_check_refuses_a_machine_without_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gpu_check.main(["--cache", str(tmp_path / "c.npz"), "--out", str(tmp_path / "r.json")])
    assert code == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_work_dir_must_be_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("a user's file", encoding="utf-8")
    out = tmp_path / "r.json"
    code = gpu_check.main(["--dry-run", "--out", str(out), "--work-dir", str(work)])
    assert code == 2
    assert str(work) in capsys.readouterr().err
    assert sorted(path.name for path in work.iterdir()) == ["keep.txt"]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.real_data
def test_make_cache_of_the_real_pc_training_split(cho_k1_root: Path, tmp_path: Path) -> None:
    from twinvae.data.readers import load_image_set

    cache = tmp_path / "pc-train.npz"
    gpu_check.make_cache(cache, cho_k1_root, "pc", "train")
    loaded = gpu_check.read_cache(cache)
    expected = load_image_set(cho_k1_root / "pc", split="train", modality="pc")
    assert loaded.names == list(expected.names)
    np.testing.assert_array_equal(loaded.counts, expected.counts)
    np.testing.assert_array_equal(loaded.images, expected.images)
    # the device machine takes 64 MiB in all, and the wheels need about 15 of them
    assert cache.stat().st_size < 45 * 2**20


def _train_until_stopped(stop: Any, seconds: float) -> bool:
    """A stand-in for train(): works until interrupted; True when TimeUp ended it."""
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
        return False
    except gpu_check.TimeUp:
        return True
    finally:
        stop.active = False


def test_training_stops_at_its_time_only_after_a_saved_epoch(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text(
        "epoch,val_mae,images_per_second\n1,3.5,100.0\n", encoding="utf-8"
    )
    with gpu_check.StopAtDeadline(tmp_path, seconds=0.1) as stop:
        assert not _train_until_stopped(stop, 1.0)  # no checkpoint yet: it goes on
    assert not stop.fired
    assert [row["val_mae"] for row in stop.rows] == ["3.5"]
    (tmp_path / "last.pt").write_bytes(b"")
    started = time.monotonic()
    with gpu_check.StopAtDeadline(tmp_path, seconds=0.3) as stop:
        assert _train_until_stopped(stop, 30.0)
    assert stop.fired and 0.3 <= time.monotonic() - started < 10.0
