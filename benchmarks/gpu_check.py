"""One-shot GPU check of twinvae: the CUDA tests, training speed, and a short real-data training.

On a CUDA machine one command (``benchmarks/gpu_check.sh``, or this script) runs three phases,
each in child processes under a time limit, so that the whole check ends within ``--budget-s``:

1. ``cuda_tests``: ``pytest -m cuda`` on the test files that use the ``cuda`` marker;
2. ``speed_cpu``, ``speed_device``, ``speed_device_compiled``: images/s of Twin-VAE training
   steps (both domains, batch ``--batch`` each, host-to-device copy, augmentation on the device,
   fused Adam, channels_last, the precision ``train.precision: auto`` picks: fp16 autocast with
   loss scaling on CUDA) on the CPU, on the GPU, and on the GPU under ``torch.compile``;
3. ``training``: ``paper-pc`` (``paper-bf`` for a bf cache) trained by ``train`` for
   ``--train-seconds`` on real CHO-K1 images read from a compressed cache (``--make-cache``
   writes it where the data is; ``--cache`` reads it), stopped at that time once one epoch is
   done; its validation MAE per epoch.

Everything goes into one JSON file (``--out``), hardware named. ``--dry-run`` runs the same
phases on the CPU in seconds (tiny model, a few steps, torch.compile's "eager" backend, which
needs no C compiler) and writes the same layout with ``"dry_run": true``; CI runs it.

    python benchmarks/gpu_check.py --make-cache gpu-check/pc-train.npz    # where the data is
    benchmarks/gpu_check.sh gpu-check/pc-train.npz gpu-check/result.json  # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out gpu-check/dry.json     # any CPU

twinvae's own modules are imported inside the functions that use them, so that a moved name
breaks one phase (reported in the JSON), not the check. Never run in CI except as --dry-run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_VERSION = 1
CACHE_FORMAT = "twinvae-gpu-check-cache/1"
SPEED_PHASES = ("speed_cpu", "speed_device", "speed_device_compiled")
PHASES = ("cuda_tests", *SPEED_PHASES, "training")
TINY_MODEL = ["model.base_channels=4", "model.latent_dim=8", "model.regressor_hidden=[8]"]
OUTPUT_TAIL_CHARS = 4000


class CheckError(Exception):
    """A problem with the user's input (cache, folders, machine); printed as one line."""


# ---- plan: what runs, with which limits ------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes and time limits of one check (full on CUDA, or the dry run on the CPU)."""

    dry_run: bool
    device: str
    budget_s: float
    tests_limit_s: float
    speed_batch: int
    speed_seconds: float  # timed part of each speed measurement
    speed_warmup_steps: int
    speed_min_steps: int
    speed_limit_s: float  # the child that runs all three speed measurements
    compile_backend: str
    model_overrides: list[str]
    train_seconds: float
    train_overrides: list[str]
    train_min_s: float  # kept free for training while the earlier phases run
    train_startup_s: float  # process start, data unpacking, the epoch in progress at the stop
    torch_threads: int | None  # None: torch's default (all cores)
    final_reserve_s: float = 10.0  # writing the JSON


def make_plan(args: argparse.Namespace) -> Plan:
    """The full check or the dry run, with the user's options applied."""
    if args.dry_run:
        plan = Plan(
            dry_run=True,
            device="cpu",
            budget_s=180.0,
            tests_limit_s=90.0,
            speed_batch=4,
            speed_seconds=0.5,
            speed_warmup_steps=1,
            speed_min_steps=2,
            speed_limit_s=120.0,
            compile_backend="eager",
            model_overrides=TINY_MODEL,
            train_seconds=1.0,
            train_overrides=[
                "train.batch_size=4",
                "train.steps_per_epoch=1",
                "train.epochs=100000",
                "train.early_stopping_patience=null",
                "train.device=cpu",
            ],
            train_min_s=30.0,
            train_startup_s=25.0,
            # tiny tensors: one thread is as fast and does not wait for descheduled ones
            torch_threads=1,
        )
    else:
        plan = Plan(
            dry_run=False,
            device="cuda",
            budget_s=420.0,
            tests_limit_s=90.0,
            speed_batch=128,
            speed_seconds=12.0,
            speed_warmup_steps=3,
            speed_min_steps=3,
            speed_limit_s=240.0,
            compile_backend="inductor",
            model_overrides=[],
            train_seconds=180.0,
            train_overrides=["train.device=cuda"],
            train_min_s=150.0,
            train_startup_s=40.0,
            torch_threads=None,
        )
    updates: dict[str, Any] = {}
    if args.budget_s is not None:
        updates["budget_s"] = args.budget_s
    if args.train_seconds is not None:
        updates["train_seconds"] = args.train_seconds
    if args.batch is not None:
        updates["speed_batch"] = args.batch
    if args.speed_seconds is not None:
        updates["speed_seconds"] = args.speed_seconds
    if args.compile_backend is not None:
        updates["compile_backend"] = args.compile_backend
    updates["train_overrides"] = [*plan.train_overrides, *args.overrides]
    return dataclasses.replace(plan, **updates)


class Budget:
    """The check's deadline; each phase gets its own limit, cut to what the later ones need."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, wanted: float, reserve_after: float) -> float:
        """``wanted`` seconds, or less so that ``reserve_after`` stays for the later phases."""
        return max(0.0, min(wanted, self.left() - reserve_after))


# ---- the CHO-K1 cache ------------------------------------------------------------------------


@dataclass
class CachedImages:
    """Decoded images of one CHO-K1 split with their counts and names (relative paths)."""

    images: np.ndarray
    counts: np.ndarray
    names: list[str]
    modality: str
    split: str

    @property
    def labelled(self) -> int:
        return int(np.count_nonzero(self.counts > 0))


def _safe_name(name: str, cache: Path) -> str:
    """The relative PNG path an image is unpacked to; refuses names that leave the folder."""
    path = PurePosixPath(name)
    unusable = (
        not name
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in path.parts)
        or any(character in name for character in ',"\\\n\r')
    )
    if unusable:
        raise CheckError(
            f"{cache}: image name {name!r} is not a safe relative path; make the cache anew "
            "with --make-cache"
        )
    return str(path.with_suffix(".png"))


def write_cache(path: Path, cached: CachedImages) -> None:
    """Store the images compressed (zlib, .npz without pickled objects), atomically."""
    for name in cached.names:
        _safe_name(name, path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("wb") as handle:
            np.savez_compressed(
                handle,
                format=np.array(CACHE_FORMAT),
                images=np.ascontiguousarray(cached.images, dtype=np.uint8),
                counts=np.asarray(cached.counts, dtype=np.int16),
                names=np.array(cached.names, dtype=str),
                modality=np.array(cached.modality),
                split=np.array(cached.split),
            )
        os.replace(temporary, path)
    except OSError as error:
        raise CheckError(f"{path}: cannot write the cache ({error.strerror or error})") from None
    finally:
        temporary.unlink(missing_ok=True)


def read_cache(path: Path) -> CachedImages:
    """The cache written by `write_cache`; errors name the file and say how to fix it."""
    remake = "make it with `python benchmarks/gpu_check.py --make-cache FILE` where the data is"
    if not path.is_file():
        raise CheckError(f"{path}: cache not found; {remake}")
    try:
        with np.load(path, allow_pickle=False) as stored:
            keys = set(stored.files)
            wanted = {"format", "images", "counts", "names", "modality", "split"}
            if not wanted <= keys or str(stored["format"]) != CACHE_FORMAT:
                raise CheckError(f"{path}: not a {CACHE_FORMAT} file; {remake}")
            cached = CachedImages(
                images=stored["images"],
                counts=stored["counts"],
                names=[str(name) for name in stored["names"]],
                modality=str(stored["modality"]),
                split=str(stored["split"]),
            )
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise CheckError(f"{path}: unreadable cache ({error}); {remake}") from None
    images = cached.images
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) == 0:
        raise CheckError(
            f"{path}: images must be (N, H, W) uint8, got {images.dtype} {images.shape}"
        )
    if cached.counts.shape != (len(images),) or len(cached.names) != len(images):
        raise CheckError(f"{path}: images, counts and names differ in number; {remake}")
    if cached.modality not in ("bf", "pc"):
        raise CheckError(f"{path}: modality {cached.modality!r} is neither bf nor pc; {remake}")
    for name in cached.names:
        _safe_name(name, path)
    return cached


def make_cache(out: Path, data: Path, modality: str, split: str) -> CachedImages:
    """Read one split of the CHO-K1 data with twinvae's reader and store it in ``out``."""
    from twinvae.data.readers import load_image_set
    from twinvae.errors import TwinVAEError

    try:
        image_set = load_image_set(data, split=split, modality=modality)  # type: ignore[arg-type]
    except TwinVAEError as error:
        raise CheckError(str(error)) from None
    cached = CachedImages(
        image_set.images, image_set.counts, list(image_set.names), modality, split
    )
    write_cache(out, cached)
    return cached


def unpack_cache(cached: CachedImages, folder: Path, source: Path) -> Path:
    """Write the images as a CHO-K1 modality folder (``<split>.csv`` + PNGs) in ``folder``.

    The trainer then reads them with the reader it uses for the real data, so the validation
    split and the training are those of the real folder (PNG is lossless).
    """
    from PIL import Image

    target = folder / cached.modality
    if target.exists() and any(target.iterdir()):
        raise CheckError(f"{target}: not empty; choose another --work-dir")
    relative = [_safe_name(name, source) for name in cached.names]
    if len(set(relative)) != len(relative):
        raise CheckError(f"{source}: two images share one name; make the cache anew")

    def write(index: int) -> None:
        path = target / relative[index]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cached.images[index]).save(path, format="PNG", compress_level=1)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # Pillow encodes without GIL
        list(pool.map(write, range(len(relative))))
    rows = [f"{name},{int(count)}" for name, count in zip(relative, cached.counts, strict=True)]
    (target / f"{cached.split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return target


def generated_cache(count: int = 36, chambers: int = 3, seed: int = 5) -> CachedImages:
    """Natural-style generated images named like microscope exports, for the dry run."""
    from twinvae.data.synthetic import SynthConfig, generate

    generated = generate(SynthConfig.for_modality("pc", style="natural"), count, seed=seed)
    frames = count // chambers
    names = [
        f"train/dryrunxy{i // frames + 1:02d}t{i % frames + 1:03d}c1.png" for i in range(count)
    ]
    counts = np.where(np.arange(count) % 3 == 0, generated.counts, 0)
    return CachedImages(generated.images, counts, names, "pc", "train")


# ---- hardware --------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _nvidia_smi() -> list[dict[str, str]] | None:
    query = "name,driver_version,memory.total"
    try:
        result = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    keys = query.split(",")
    return [
        dict(zip(keys, (value.strip() for value in line.split(",")), strict=False))
        for line in result.stdout.splitlines()
        if line.strip()
    ]


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def hardware() -> dict[str, Any]:
    """The machine, its GPUs and the software versions the figures depend on."""
    import torch

    gpus: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "name": properties.name,
                    "capability": f"{properties.major}.{properties.minor}",
                    "memory_gib": round(properties.total_memory / 2**30, 1),
                    "multiprocessors": properties.multi_processor_count,
                }
            )
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        from importlib.metadata import version

        twinvae_version: str | None = version("twinvae")
    except Exception:  # not installed: run from a checkout
        twinvae_version = None
    return {
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "gpus": gpus,
        "nvidia_smi": _nvidia_smi() if gpus else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "numpy": np.__version__,
        "twinvae": twinvae_version,
        "git_commit": _git_commit(),
    }


# ---- child processes -------------------------------------------------------------------------


@dataclass
class ChildRun:
    returncode: int | None  # None: killed at its time limit
    seconds: float
    output_tail: str


def run_child(
    command: Sequence[str], limit_s: float, log: Path, env: dict[str, str] | None = None
) -> ChildRun:
    """Run ``command`` in its own process group; kill the whole group at ``limit_s``."""
    started = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as stream:
        process = subprocess.Popen(
            list(command),
            stdout=stream,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
            start_new_session=True,  # its own group: compile workers and pytest go with it
        )
        try:
            returncode: int | None = process.wait(timeout=max(limit_s, 0.1))
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    text = log.read_text(encoding="utf-8", errors="replace")
    return ChildRun(returncode, time.monotonic() - started, text[-OUTPUT_TAIL_CHARS:])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # GPU machines often have no C compiler: twinvae's CPU kernels stay off unless asked for
    env.setdefault("TWINVAE_CPU_KERNELS", "0")
    return env


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _finite(value: float | None, digits: int = 4) -> float | None:
    return round(value, digits) if value is not None and math.isfinite(value) else None


# ---- phase 1: the CUDA tests -----------------------------------------------------------------


def cuda_test_files() -> list[Path]:
    """Test files that use the ``cuda`` marker."""
    tests = ROOT / "tests"
    if not tests.is_dir():
        return []
    return sorted(
        path
        for path in tests.glob("test_*.py")
        if "mark.cuda" in path.read_text(encoding="utf-8", errors="replace")
    )


def _junit_counts(report: Path) -> dict[str, Any]:
    """Passed, failed, errors, skipped and the failing tests' ids from pytest's JUnit XML."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "problems": []}
    try:
        tree = ElementTree.parse(report)
    except (OSError, ElementTree.ParseError):
        return counts
    for case in tree.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["problems"].append(test_id)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["problems"].append(test_id)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def run_cuda_tests(work: Path, limit_s: float) -> dict[str, Any]:
    files = cuda_test_files()
    result: dict[str, Any] = {"limit_s": round(limit_s, 1), "files": []}
    if not files:
        return {
            **result,
            "status": "error",
            "reason": f"no test file in {ROOT / 'tests'} is marked cuda",
        }
    result["files"] = [str(path.relative_to(ROOT)) for path in files]
    report = work / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda"]
    command += ["--junitxml", str(report), *result["files"]]
    child = run_child(command, limit_s, work / "logs" / "cuda_tests.log", _child_env())
    result.update(_junit_counts(report))
    result["seconds"] = round(child.seconds, 1)
    if child.returncode is None:
        result["status"] = "timeout"
    else:
        result["status"] = "ok" if child.returncode == 0 else "failed"
        result["pytest_returncode"] = child.returncode
    if result["status"] != "ok":
        result["output_tail"] = child.output_tail
    return result


# ---- phase 2: training speed -----------------------------------------------------------------


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accelerate_as_the_trainer(model: Any, layers_for: str, device: Any) -> str:
    """Give ``model`` the faster training layers the trainer uses on ``layers_for`` (a device
    type); returns which API did it.

    The dry run measures its "device" phases on the CPU with the CUDA layers, the code a GPU
    runs. ``twinvae.accel.accelerate`` replaced ``TwinVAE.fast_kernels`` (CPU layers whenever
    the tensors are on the CPU); either is used, whichever this checkout has.
    """
    try:
        from twinvae.accel import accelerate
    except ImportError:
        old_api = isinstance(getattr(type(model), "fast_kernels", None), property)
        if not old_api or layers_for != device.type:
            return "none"
        model.fast_kernels = True
        return "TwinVAE.fast_kernels"
    accelerate(model, layers_for)
    return f"twinvae.accel.accelerate({layers_for})"


def measure_speed(spec: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Images/s of Twin-VAE training steps as the trainer makes them (one domain after the
    other; on the CPU the trainer runs them side by side, a few % faster)."""
    import torch

    from twinvae.config import load_config
    from twinvae.models.twin_vae import TwinVAE
    from twinvae.training.augment import augment_batch
    from twinvae.training.data import to_tensor
    from twinvae.training.device import select_precision
    from twinvae.training.losses import twin_domain_loss
    from twinvae.training.trainer import make_optimizer

    # paper-pc's model, loss, optimiser and augmentation; no data is read
    config = load_config("paper-pc", [*spec["model_overrides"], "data.natural=null"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    precision = select_precision(config.train.precision, device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    channels_last = config.train.channels_last
    torch.manual_seed(0)
    model = TwinVAE(config.model)
    acceleration = _accelerate_as_the_trainer(model, spec["layers_for"], device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    optimizer = make_optimizer(model, config.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    forward: Callable[..., Any] = model
    if spec["compile"]:
        forward = torch.compile(model, backend=spec["backend"])
    batch = int(spec["batch"])
    rng = np.random.default_rng(0)
    host = {
        domain: (
            rng.integers(0, 256, (batch, 128, 128), dtype=np.uint8),
            rng.integers(0, 31, batch).astype(np.float32),
        )
        for domain in ("natural", "synthetic")
    }
    augment_rng = torch.Generator().manual_seed(0)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        total: Any = None
        for domain, (images_np, counts_np) in host.items():
            images = augment_batch(
                to_tensor(images_np, device, channels_last), config.augment, augment_rng
            )
            counts = torch.from_numpy(counts_np).to(device)
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                output = forward(images, domain, sample=True, decode=True)
                loss = twin_domain_loss(
                    output,
                    images,
                    counts,
                    config.loss,
                    rec_weight=config.loss.rec_weight,
                    regressor_on=True,
                )
            total = loss.total if total is None else total + loss.total
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(total.detach())  # the trainer reads the loss every step too

    started = time.perf_counter()
    for _ in range(int(spec["warmup_steps"])):  # the first steps compile under torch.compile
        step()
    _synchronize(device)
    warmup_seconds = time.perf_counter() - started
    step_seconds: list[float] = []
    losses: list[float] = []
    timed_start = time.perf_counter()
    while len(step_seconds) < int(spec["min_steps"]) or (
        time.perf_counter() - timed_start < float(spec["seconds"]) and time.monotonic() < deadline
    ):
        step_start = time.perf_counter()
        losses.append(step())
        step_seconds.append(time.perf_counter() - step_start)
    _synchronize(device)
    elapsed = time.perf_counter() - timed_start
    images = len(step_seconds) * 2 * batch
    result: dict[str, Any] = {
        "status": "ok" if all(math.isfinite(loss) for loss in losses) else "error",
        "device": device.type,
        "precision": precision,
        "channels_last": channels_last,
        "compiled": bool(spec["compile"]),
        "backend": spec["backend"] if spec["compile"] else None,
        "acceleration": acceleration,
        "cpu_kernels_env": os.environ.get("TWINVAE_CPU_KERNELS"),
        "torch_threads": torch.get_num_threads(),
        "batch_per_domain": batch,
        "model": {
            "base_channels": config.model.base_channels,
            "latent_dim": config.model.latent_dim,
        },
        "warmup_steps": int(spec["warmup_steps"]),
        "warmup_seconds": round(warmup_seconds, 3),
        "steps": len(step_seconds),
        "timed_seconds": round(elapsed, 3),
        "images_per_second": round(images / elapsed, 1),
        "step_seconds_median": round(statistics.median(step_seconds), 5),
        "last_loss": _finite(losses[-1]),
    }
    if result["status"] != "ok":
        result["reason"] = "a loss was not finite"
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = round(
            torch.cuda.max_memory_allocated(device) / 2**30, 2
        )
    return result


def speed_child(spec_path: Path, result_path: Path) -> None:
    """The three speed measurements in turn; each result is written as soon as it is known."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    deadline = time.monotonic() + float(spec["limit_s"])
    results: dict[str, Any] = {}
    for name in SPEED_PHASES:
        measurement = {**spec, **spec["measurements"][name]}
        started = time.monotonic()
        try:
            results[name] = measure_speed(measurement, deadline)
        except Exception as error:  # one failed measurement (e.g. no compiler) leaves the rest
            results[name] = {"status": "error", "reason": f"{type(error).__name__}: {error}"}
        results[name]["seconds"] = round(time.monotonic() - started, 1)
        _write_json(result_path, results)
        _release_device_memory()


def _release_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_speed(plan: Plan, work: Path, limit_s: float) -> dict[str, dict[str, Any]]:
    common = {
        "batch": plan.speed_batch,
        "seconds": plan.speed_seconds,
        "warmup_steps": plan.speed_warmup_steps,
        "min_steps": plan.speed_min_steps,
        "model_overrides": plan.model_overrides,
        "backend": plan.compile_backend,
        "threads": plan.torch_threads,
        "limit_s": limit_s,
    }
    spec = {
        **common,
        "measurements": {
            "speed_cpu": {"device": "cpu", "layers_for": "cpu", "compile": False},
            "speed_device": {"device": plan.device, "layers_for": "cuda", "compile": False},
            "speed_device_compiled": {"device": plan.device, "layers_for": "cuda", "compile": True},
        },
    }
    spec_path, result_path = work / "speed_spec.json", work / "speed_result.json"
    _write_json(spec_path, spec)
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", "speed"]
    command += ["--spec", str(spec_path), "--result", str(result_path)]
    # the hard limit leaves the child's own deadline a little room to end the timed loop
    child = run_child(command, limit_s + 15, work / "logs" / "speed.log", _child_env())
    measured = _read_json(result_path)
    results: dict[str, dict[str, Any]] = {}
    for name in SPEED_PHASES:
        if name in measured:
            results[name] = measured[name]
            continue
        status = "timeout" if child.returncode is None else "error"
        results[name] = {"status": status, "output_tail": child.output_tail}
    for result in results.values():
        result["limit_s"] = round(limit_s, 1)
    return results


# ---- phase 3: training paper-pc (or paper-bf) from the cache ---------------------------------


class TimeUp(BaseException):
    """Raised in the main thread when the training phase's time is up."""


class StopAtDeadline:
    """Stops a run at a fixed time: once ``seconds`` have passed and the run folder holds a
    validated epoch (a row in ``metrics.csv``) and its checkpoint (``last.pt``; a run stopped
    before its first checkpoint removes its files), a watcher thread interrupts the main
    thread, whose SIGINT handler raises `TimeUp` while ``active``. The caller clears ``active``
    as soon as training returns, so a late interrupt is ignored rather than raised outside its
    ``try``. ``rows`` keeps the last metrics rows the watcher read."""

    def __init__(self, run_dir: Path, seconds: float) -> None:
        self.metrics = run_dir / "metrics.csv"
        self.checkpoint = run_dir / "last.pt"
        self.deadline = time.monotonic() + seconds
        self.rows: list[dict[str, str]] = []
        self.fired = False
        self.active = True
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gpu-check-deadline", daemon=True)
        self._previous: Any = None

    def __enter__(self) -> StopAtDeadline:
        self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        self._done.set()
        self._thread.join()
        signal.signal(signal.SIGINT, self._previous)

    def _on_interrupt(self, signum: int, frame: object) -> None:
        if not self.fired:
            raise KeyboardInterrupt  # a real Ctrl-C
        if self.active:
            raise TimeUp

    def _watch(self) -> None:
        import _thread

        while not self._done.wait(0.2):
            self.rows = _metric_rows(self.metrics) or self.rows
            if time.monotonic() >= self.deadline and self.rows and self.checkpoint.exists():
                self.fired = True
                _thread.interrupt_main()
                return


def _metric_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of a run's metrics.csv (a row cut by the stop is left out)."""
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
    except OSError:
        return []
    return [row for row in rows if row.get("images_per_second") not in (None, "")]


def _number(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def training_child(spec_path: Path, result_path: Path) -> None:
    """Train the config from the cache for the spec's seconds; write the epochs' metrics."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    work = Path(spec["work"])
    started = time.monotonic()
    cache_path = Path(spec["cache"])
    cached = read_cache(cache_path)
    natural = unpack_cache(cached, work / "data", cache_path)
    unpack_seconds = time.monotonic() - started

    from twinvae.config import load_config
    from twinvae.training.device import select_precision
    from twinvae.training.trainer import train

    overrides = [
        *spec["overrides"],
        f"data.natural={json.dumps(str(natural))}",
        f"data.modality={cached.modality}",
    ]
    config = load_config(spec["config"], overrides)
    run_dir = work / "run"
    stopped_early = False
    train_started = time.monotonic()
    with StopAtDeadline(run_dir, float(spec["train_seconds"])) as stop:
        try:
            stopped_early = train(config, run_dir, progress=False).stopped_early
        except BaseException:  # TimeUp, or what the trainer made of the interrupt
            if not stop.fired:
                raise
        finally:
            stop.active = False
    train_seconds = time.monotonic() - train_started
    stopped_by = "time" if stop.fired else "early_stopping" if stopped_early else "epochs"
    rows = _metric_rows(run_dir / "metrics.csv") or stop.rows
    epochs = [
        {
            "epoch": int(row["epoch"]),
            "loss": _finite(_number(row.get("loss"))),
            "val_mae": _finite(_number(row.get("val_mae"))),
            "images_per_second": _number(row.get("images_per_second")),
            "seconds": _number(row.get("seconds")),
        }
        for row in rows
    ]
    validated = [epoch for epoch in epochs if epoch["val_mae"] is not None]
    best = min(validated, key=lambda epoch: epoch["val_mae"] or 0.0) if validated else None
    speeds = [epoch["images_per_second"] for epoch in epochs if epoch["images_per_second"]]
    import torch

    result = {
        "status": "ok" if validated else "error",
        "config": spec["config"],
        "overrides": spec["overrides"],
        "device": config.train.device,
        "precision": select_precision(config.train.precision, torch.device(_device(config))),
        "data": {
            "cache": cache_path.name,
            "modality": cached.modality,
            "split": cached.split,
            "images": len(cached.images),
            "labelled": cached.labelled,
            "validation": f"data.val_fraction={config.data.val_fraction} of the labelled "
            f"images, whole chambers (data.split_by={config.data.split_by})",
        },
        "unpack_seconds": round(unpack_seconds, 1),
        "train_seconds_requested": spec["train_seconds"],
        "train_seconds": round(train_seconds, 1),
        "stopped_by": stopped_by,
        "epochs_completed": len(epochs),
        "val_mae_last": validated[-1]["val_mae"] if validated else None,
        "val_mae_best": best["val_mae"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "trainer_images_per_second_median": round(statistics.median(speeds), 1) if speeds else None,
        "epochs": epochs,
    }
    if not validated:
        result["reason"] = "no epoch was validated within the time"
    _write_json(result_path, result)


def _device(config: Any) -> str:
    import torch

    requested = str(config.train.device)
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def run_training(
    plan: Plan, work: Path, cache: Path, modality: str, limit_s: float
) -> dict[str, Any]:
    train_seconds = max(1.0, min(plan.train_seconds, limit_s - plan.train_startup_s))
    threads = [f"train.num_threads={plan.torch_threads}"] if plan.torch_threads else []
    spec = {
        "config": f"paper-{modality}",
        "overrides": [*plan.model_overrides, *threads, *plan.train_overrides],
        "cache": str(cache),
        "work": str(work / "training"),
        "train_seconds": round(train_seconds, 1),
    }
    spec_path, result_path = work / "training_spec.json", work / "training_result.json"
    _write_json(spec_path, spec)
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", "training"]
    command += ["--spec", str(spec_path), "--result", str(result_path)]
    child = run_child(command, limit_s, work / "logs" / "training.log", _child_env())
    result = _read_json(result_path)
    if not result:
        status = "timeout" if child.returncode is None else "error"
        result = {"status": status, "train_seconds_requested": spec["train_seconds"]}
        result["output_tail"] = child.output_tail
    result["limit_s"] = round(limit_s, 1)
    result["seconds"] = round(child.seconds, 1)
    return result


# ---- the check -------------------------------------------------------------------------------


def _skipped(limit_s: float) -> dict[str, Any]:
    return {"status": "skipped", "reason": "no time left in the budget", "limit_s": limit_s}


def _ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float | None:
    top, bottom = numerator.get("images_per_second"), denominator.get("images_per_second")
    if numerator.get("status") != "ok" or denominator.get("status") != "ok":
        return None
    if not isinstance(top, int | float) or not isinstance(bottom, int | float) or bottom <= 0:
        return None
    return round(top / bottom, 2)


def summarize(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    cpu, device = phases["speed_cpu"], phases["speed_device"]
    compiled, training = phases["speed_device_compiled"], phases["training"]
    tests = phases["cuda_tests"]
    return {
        "cuda_tests_passed": tests.get("passed"),
        "cuda_tests_failed": (tests.get("failed") or 0) + (tests.get("errors") or 0),
        "cuda_tests_skipped": tests.get("skipped"),
        "images_per_second": {name: phases[name].get("images_per_second") for name in SPEED_PHASES},
        "device_vs_cpu": _ratio(device, cpu),
        "compiled_vs_cpu": _ratio(compiled, cpu),
        "compiled_vs_device": _ratio(compiled, device),
        "val_mae_last": training.get("val_mae_last"),
        "val_mae_best": training.get("val_mae_best"),
        "epochs_completed": training.get("epochs_completed"),
    }


def _prepare_work_dir(work: Path) -> None:
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise CheckError(f"{work}: exists and is not an empty folder; remove it or pass --work-dir")
    work.mkdir(parents=True, exist_ok=True)


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """All phases within the budget; returns the report (also written to ``args.out``)."""
    started = time.monotonic()
    plan = make_plan(args)
    budget = Budget(plan.budget_s)
    import torch

    if not plan.dry_run and not torch.cuda.is_available():
        raise CheckError(
            f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "on a CPU machine run --dry-run"
        )
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.with_name(f"{out.stem}-work")
    modality = "pc"  # of the dry run's generated images
    if args.cache is not None:
        modality = read_cache(Path(args.cache)).modality  # a bad cache stops the check here
    elif not plan.dry_run:
        raise CheckError("--cache is needed (make it with --make-cache where the data is)")
    _prepare_work_dir(work)
    started_utc = datetime.now(UTC).isoformat(timespec="seconds")
    cache = Path(args.cache) if args.cache is not None else work / "dry-run-cache.npz"
    if args.cache is None:
        write_cache(cache, generated_cache())
    report: dict[str, Any] = {
        "layout_version": LAYOUT_VERSION,
        "dry_run": plan.dry_run,
        "ok": False,
        "started_utc": started_utc,
        "budget_s": plan.budget_s,
        "hardware": hardware(),
        "environment": {"TWINVAE_CPU_KERNELS": _child_env()["TWINVAE_CPU_KERNELS"]},
        "plan": dataclasses.asdict(plan),
        "phases": {},
    }
    phases: dict[str, dict[str, Any]] = report["phases"]
    training_reserve = plan.train_min_s + plan.final_reserve_s

    limit = budget.limit(plan.tests_limit_s, training_reserve)
    phases["cuda_tests"] = run_cuda_tests(work, limit) if limit >= 5 else _skipped(limit)
    print(f"cuda_tests: {phases['cuda_tests']['status']}", flush=True)

    limit = budget.limit(plan.speed_limit_s, training_reserve + 15)
    if limit >= 5:
        phases.update(run_speed(plan, work, limit))
    else:
        phases.update({name: _skipped(limit) for name in SPEED_PHASES})
    for name in SPEED_PHASES:
        print(f"{name}: {phases[name]['status']} {phases[name].get('images_per_second')} images/s")

    limit = budget.limit(budget.left(), plan.final_reserve_s)
    if limit >= plan.train_startup_s / 2:
        phases["training"] = run_training(plan, work, cache, modality, limit)
    else:
        phases["training"] = _skipped(limit)
    print(
        f"training: {phases['training']['status']} val MAE {phases['training'].get('val_mae_last')}"
    )

    report["phases"] = {name: phases[name] for name in PHASES}
    report["summary"] = summarize(phases)
    report["ok"] = all(phase.get("status") == "ok" for phase in phases.values())
    report["seconds"] = round(time.monotonic() - started, 1)
    _write_json(out, report)
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="One-shot GPU check of twinvae (CUDA tests, training speed, a short "
        "paper-pc training on real data), written to one JSON file. See benchmarks/README.md.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--make-cache",
        type=Path,
        metavar="OUT.npz",
        help="write the CHO-K1 images and counts that the training phase needs, compressed",
    )
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU only, in seconds: tiny model, a few steps, same phases and JSON layout",
    )
    mode.add_argument("--phase", choices=("speed", "training"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        default=Path(os.environ.get("TWINVAE_CHO_K1", ROOT.parent / "shared/data/cho-k1")),
        help="--make-cache: the CHO-K1 folder (default: $TWINVAE_CHO_K1 or "
        "../shared/data/cho-k1 beside the project root)",
    )
    parser.add_argument(
        "--modality",
        choices=("pc", "bf"),
        default="pc",
        help="--make-cache: the modality to store (default pc); the check trains paper-<modality>",
    )
    parser.add_argument(
        "--cache", type=Path, metavar="FILE.npz", help="the cache made with --make-cache"
    )
    parser.add_argument("--out", type=Path, metavar="FILE.json", help="the JSON report to write")
    parser.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="empty or new folder for logs, the unpacked images and the training run "
        "(default: <out stem>-work beside --out)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        metavar="SECONDS",
        help="whole check in seconds (default 420; dry run 180)",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        metavar="SECONDS",
        help="training phase, stopped there once an epoch is validated (default 180; dry run 1)",
    )
    parser.add_argument(
        "--batch", type=int, metavar="N", help="speed phases: images per domain (default 128)"
    )
    parser.add_argument(
        "--speed-seconds",
        type=float,
        metavar="SECONDS",
        help="timed seconds per speed measurement (default 12)",
    )
    parser.add_argument(
        "--compile-backend",
        metavar="NAME",
        help="torch.compile backend (default inductor; dry run eager)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of the training config (repeatable), e.g. train.batch_size=256",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.phase == "speed":
            speed_child(args.spec, args.result)
            return 0
        if args.phase == "training":
            training_child(args.spec, args.result)
            return 0
        if args.make_cache is not None:
            cached = make_cache(args.make_cache, args.data, args.modality, "train")
            size = args.make_cache.stat().st_size / 2**20
            print(
                f"wrote {args.make_cache}: {len(cached.images)} images ({cached.labelled} "
                f"labelled), {size:.1f} MiB"
            )
            return 0
        if args.out is None:
            parser.error("--out is needed (the JSON report to write)")
        report = run_check(args)
    except CheckError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {'ok' if report['ok'] else 'NOT ok'} in {report['seconds']} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
