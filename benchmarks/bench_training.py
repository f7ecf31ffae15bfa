"""Twin-VAE training throughput: the authors' way against twinvae's trainer, in the same run.

(a) authors: the paper-size TwinVAE in fp32 (NCHW, reference layers), fed by a torch Dataset
    that augments one PIL image at a time (flips, 90-degree and small rotations, crop of scale
    0.9 resized back, additive noise) through DataLoaders with num_workers=0; a plain step.
(b) twinvae: `twinvae.training.trainer.Trainer` steps: whole-batch `augment_batch`,
    channels_last, `twinvae.accel.accelerate`, the precision `train.precision` resolves to
    (bf16 autocast on CPUs with AVX512-BF16/AMX under ``auto``), the two domains' forward and
    backward passes side by side, and freed memory kept as the twinvae command keeps it.

Both train both domains at batch 64 natural + 64 synthetic on 128 x 128 generated images. Each
runs in its own process, as the two programs would (process-wide settings such as twinvae's
`keep_freed_memory` stay with their side); the two are timed alternately (a, b, a, b, ...)
after warm-up rounds, one process computing while the other waits, and the median round of
each is reported, so that load from other processes hits both alike.

    python benchmarks/bench_training.py --quick       # < 1 minute
    python benchmarks/bench_training.py               # full timing
    python benchmarks/bench_training.py --one-process # both sides in one process
    python benchmarks/bench_training.py --accuracy    # train both, compare validation MAE

Never run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from twinvae.cli.process import keep_freed_memory
from twinvae.config import ExperimentConfig, config_from_dict
from twinvae.data.imageset import ImageSet
from twinvae.data.synthetic import SynthConfig, generate
from twinvae.evaluation.metrics import count_metrics
from twinvae.models.twin_vae import TwinVAE
from twinvae.training.data import TrainingData
from twinvae.training.device import Runtime
from twinvae.training.losses import twin_domain_loss
from twinvae.training.trainer import Trainer, predict_counts

BATCH = 64
QUARTER_TURNS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


# ---- (a) the authors' way --------------------------------------------------------------------


class PilAugmentDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Per-sample augmentation with PIL and numpy, as a typical torchvision-style pipeline."""

    def __init__(
        self,
        images: np.ndarray,
        counts: np.ndarray,
        *,
        max_rotation_deg: float = 5.0,
        crop_scale: float = 0.9,
        noise_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        self.images = images
        self.counts = counts.astype(np.float32)
        self.max_rotation_deg = max_rotation_deg
        self.crop_scale = crop_scale
        self.noise_std = noise_std
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self.rng
        image = Image.fromarray(self.images[index])
        size = image.size
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        quarter = int(rng.integers(0, 4))
        if quarter:
            image = image.transpose(QUARTER_TURNS[quarter - 1])
        angle = rng.uniform(-self.max_rotation_deg, self.max_rotation_deg)
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
        side = rng.uniform(self.crop_scale, 1.0) * size[0]
        left, top = rng.uniform(0, size[0] - side), rng.uniform(0, size[1] - side)
        image = image.resize(
            size, Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
        )
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = pixels + rng.normal(0.0, self.noise_std, pixels.shape).astype(np.float32)
        tensor = torch.from_numpy(np.clip(pixels, 0.0, 1.0)).unsqueeze(0)
        return tensor, torch.tensor(self.counts[index])


def _endless(loader: DataLoader[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


class AuthorsTraining:
    """fp32 TwinVAE (reference layers, NCHW), PIL DataLoaders, one optimiser step per call."""

    def __init__(self, config: ExperimentConfig, natural: ImageSet, synthetic: ImageSet) -> None:
        torch.manual_seed(config.train.seed)
        self.config = config
        self.model = TwinVAE(config.model)
        labelled = natural.counts[natural.labelled]
        self.model.regressor.start_at(float(labelled.mean()))  # as twinvae's trainer does
        # the stock (for-loop) Adam; twinvae's trainer uses the fused one
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
        )
        self.batches = {
            domain: _endless(
                DataLoader(
                    PilAugmentDataset(images.images, images.counts, seed=config.train.seed + i),
                    batch_size=BATCH,
                    shuffle=True,
                    num_workers=0,
                    drop_last=True,
                )
            )
            for i, (domain, images) in enumerate((("natural", natural), ("synthetic", synthetic)))
        }

    def step(self) -> int:
        self.model.train()
        total = torch.zeros(())
        for domain in ("natural", "synthetic"):
            images, counts = next(self.batches[domain])
            output = self.model(images, domain)
            loss = twin_domain_loss(
                output,
                images,
                counts,
                self.config.loss,
                rec_weight=self.config.loss.rec_weight,
                regressor_on=True,
            )
            total = total + loss.total
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return 2 * BATCH


# ---- (b) twinvae's trainer -------------------------------------------------------------------


class ProjectTraining:
    """`Trainer` epochs of ``steps`` steps each (its own sampling, augmentation and precision)."""

    def __init__(self, config: ExperimentConfig, data: TrainingData, run_dir: Path) -> None:
        self.trainer = Trainer(config, run_dir, data=data, progress=False)
        self.epoch = 0
        self.steps = self.trainer.steps_per_epoch

    def run(self) -> int:
        self.trainer._train_epoch(self.epoch, lambda: None)
        self.epoch += 1
        return self.steps * 2 * BATCH


# ---- set-up ----------------------------------------------------------------------------------


def make_image_sets(n_natural: int, n_synthetic: int, n_val: int, seed: int) -> dict[str, ImageSet]:
    """Generated natural-style (all labelled) and synthetic-style images with counts."""
    natural_style = SynthConfig.for_modality("pc", style="natural")
    natural = generate(natural_style, n_natural + n_val, seed=seed)
    return {
        "natural": natural.subset(np.arange(n_natural)),
        "val": natural.subset(np.arange(n_natural, n_natural + n_val)),
        "synthetic": generate(SynthConfig.for_modality("pc"), n_synthetic, seed=seed + 1),
    }


def experiment_config(
    precision: str, steps_per_epoch: int, epochs: int, lr: float | None = None
) -> ExperimentConfig:
    """The paper-size model and PC loss weights at batch 64 + 64, stored synthetic images."""
    return config_from_dict(
        {
            "name": "bench",
            "optim": {} if lr is None else {"lr": lr},
            "data": {"synthetic": "stored", "labelled_fraction": None, "synthetic_ratio": 1.0},
            "train": {
                "batch_size": BATCH,
                "steps_per_epoch": steps_per_epoch,
                "epochs": epochs,
                "device": "cpu",
                "precision": precision,
                "channels_last": True,
                "early_stopping_patience": None,
            },
        }
    )


def machine() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }


# ---- modes -----------------------------------------------------------------------------------


@dataclass
class Timing:
    seconds_per_image: list[float] = field(default_factory=list)
    cpu_seconds_per_image: list[float] = field(default_factory=list)

    def add(self, seconds: float, cpu_seconds: float, images: int) -> None:
        self.seconds_per_image.append(seconds / images)
        self.cpu_seconds_per_image.append(cpu_seconds / images)

    @property
    def median_images_per_second(self) -> float:
        return 1.0 / statistics.median(self.seconds_per_image)

    @property
    def median_images_per_cpu_second(self) -> float:
        """Less sensitive to other processes than wall time (CPU time of all our threads)."""
        return 1.0 / statistics.median(self.cpu_seconds_per_image)

    def spread(self) -> tuple[float, float]:
        """(slowest, fastest) images per second over the timed rounds."""
        return 1.0 / max(self.seconds_per_image), 1.0 / min(self.seconds_per_image)


def timed(run: Any) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (this process) and images of one call."""
    start, cpu_start = time.perf_counter(), time.process_time()
    images = run()
    return time.perf_counter() - start, time.process_time() - cpu_start, images


def build(kind: str, args: argparse.Namespace, folder: Path) -> tuple[Callable[[], int], str]:
    """One side of the comparison: a function running one timed round, and its precision."""
    sets = make_image_sets(args.pool, args.pool, 64, seed=0)
    config = experiment_config(args.precision, args.steps, args.warmup + args.rounds + 1)
    if kind == "twinvae":
        keep_freed_memory()  # what the twinvae command does for its process
        data = TrainingData(sets["natural"], sets["val"], sets["synthetic"], None)
        project = ProjectTraining(config, data, folder / "run")
        return project.run, project.trainer.runtime.precision
    authors = AuthorsTraining(config, sets["natural"], sets["synthetic"])
    return (lambda: sum(authors.step() for _ in range(args.steps))), "fp32"


def serve(kind: str, args: argparse.Namespace, connection: Connection) -> None:
    """Worker process: build one side, then run a round whenever asked and send its timing."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run, precision = build(kind, args, Path(tmp))
        connection.send(precision)
        while connection.recv() == "round":
            connection.send(timed(run))


class Side:
    """One side, in its own process (default) or in this one (``--one-process``)."""

    def __init__(self, kind: str, args: argparse.Namespace, folder: Path) -> None:
        self.process: BaseProcess | None = None
        if args.one_process:
            self.run, self.precision = build(kind, args, folder)
            return
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=serve, args=(kind, args, child), daemon=True)
        self.process.start()
        self.precision = self.connection.recv()

    def round(self) -> tuple[float, float, int]:
        if self.process is None:
            return timed(self.run)
        self.connection.send("round")
        result: tuple[float, float, int] = self.connection.recv()
        return result

    def close(self) -> None:
        if self.process is None:
            return
        # a dead worker's own error is what the user needs to see, not a broken pipe
        with contextlib.suppress(OSError):
            if self.process.is_alive():
                self.connection.send("stop")
        self.process.join(timeout=60)


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        sides: dict[str, Side] = {}
        try:
            for name in ("authors", "twinvae"):
                sides[name] = Side(name, args, Path(tmp) / name)
            timings = {name: Timing() for name in sides}
            for index in range(args.warmup + args.rounds):
                for name, side in sides.items():
                    seconds, cpu_seconds, images = side.round()
                    if index >= args.warmup:
                        timings[name].add(seconds, cpu_seconds, images)
                    print(
                        f"round {index + 1} {name:8s} {images / seconds:7.1f} img/s "
                        f"{images / cpu_seconds:7.1f} img/cpu-s",
                        flush=True,
                    )
        finally:
            for side in sides.values():
                side.close()
        precision = sides["twinvae"].precision
    result = {
        "mode": "quick" if args.quick else "full",
        "processes": "one" if args.one_process else "one per side",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "precision": precision,
        "warmup_rounds": args.warmup,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
    }
    for name, timing in timings.items():
        slow, fast = timing.spread()
        result[name] = {
            "median_images_per_second": round(timing.median_images_per_second, 1),
            "slowest_round": round(slow, 1),
            "fastest_round": round(fast, 1),
            "median_images_per_cpu_second": round(timing.median_images_per_cpu_second, 1),
        }
    ours, theirs = timings["twinvae"], timings["authors"]
    result["ratio"] = round(ours.median_images_per_second / theirs.median_images_per_second, 2)
    result["ratio_cpu_time"] = round(
        ours.median_images_per_cpu_second / theirs.median_images_per_cpu_second, 2
    )
    return result


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """Train (a), (b) in fp32 and (b) in the chosen precision for the same steps, in turns of
    ``--accuracy-every`` steps, and report the validation MAE of each after every turn."""
    sets = make_image_sets(args.accuracy_images, args.accuracy_images, 256, seed=1)
    data = TrainingData(sets["natural"], sets["val"], sets["synthetic"], None)
    val = sets["val"]
    fp32 = Runtime(torch.device("cpu"), "fp32")
    turns = max(1, args.accuracy_steps // args.accuracy_every)
    every = args.accuracy_steps // turns
    mean_guess = np.full(len(val), float(sets["natural"].counts.mean()), dtype=np.float32)
    curves: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        projects: dict[str, ProjectTraining] = {}
        for requested in ("fp32", args.precision):
            config = experiment_config(requested, every, turns, args.accuracy_lr)
            project = ProjectTraining(config, data, Path(tmp) / requested)
            projects.setdefault(project.trainer.runtime.precision, project)
        authors = AuthorsTraining(
            experiment_config("fp32", every, turns, args.accuracy_lr),
            sets["natural"],
            sets["synthetic"],
        )
        names = {"authors_fp32": "authors", **{f"twinvae_{p}": p for p in projects}}
        for turn in range(turns):
            for name, key in names.items():
                started = time.perf_counter()
                if key == "authors":
                    for _ in range(every):
                        authors.step()
                    model = authors.model
                else:
                    projects[key].run()
                    model = projects[key].trainer.model
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
                predicted = predict_counts(model, val.images, fp32)
                point = {
                    "step": (turn + 1) * every,
                    "val_mae": round(count_metrics(predicted, val.counts)["mae"], 3),
                }
                if key not in ("authors", "fp32"):
                    own = predict_counts(model, val.images, projects[key].trainer.runtime)
                    point[f"val_mae_{key}_inference"] = round(
                        count_metrics(own, val.counts)["mae"], 3
                    )
                curves.setdefault(name, []).append(point)
                print(name, point, flush=True)
    return {
        "mode": "accuracy",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "steps": turns * every,
        "lr": args.accuracy_lr,
        "train_images_per_domain": args.accuracy_images,
        "val_images": len(val),
        "val_mae_of_predicting_the_mean": round(count_metrics(mean_guess, val.counts)["mae"], 3),
        "final_val_mae": {name: curve[-1]["val_mae"] for name, curve in curves.items()},
        # single evaluations scatter by about +-0.5 at this stage; the later half is steadier
        "mean_val_mae_later_half": {
            name: round(statistics.mean(p["val_mae"] for p in curve[len(curve) // 2 :]), 3)
            for name, curve in curves.items()
        },
        "train_seconds": {name: round(value, 1) for name, value in seconds.items()},
        "curves": curves,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short timing run (< 1 minute)")
    parser.add_argument("--accuracy", action="store_true", help="train both and compare val MAE")
    parser.add_argument("--rounds", type=int, help="timed rounds per variant (default 10, quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed rounds (default 2, quick 1)")
    parser.add_argument("--steps", type=int, help="training steps per round (default 2, quick 1)")
    parser.add_argument("--pool", type=int, default=256, help="generated images per domain")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="twinvae precision"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="time both sides in this process (default: each in its own, as two programs)",
    )
    parser.add_argument("--accuracy-steps", type=int, default=240, help="steps per variant")
    parser.add_argument("--accuracy-every", type=int, default=40, help="steps between evaluations")
    parser.add_argument("--accuracy-lr", type=float, default=2e-4, help="Adam learning rate")
    parser.add_argument("--accuracy-images", type=int, default=1024, help="training images")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.steps = args.steps or (1 if quick else 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = accuracy(args) if args.accuracy else throughput(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        if args.json.exists():
            raise SystemExit(f"{args.json} exists; not overwriting it")
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
