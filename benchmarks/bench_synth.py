"""Images per second of twinvae's synthetic generator vs a per-image PIL baseline.

The baseline draws like the authors' generator: for every image a Python loop places the cells
by rejection sampling and draws each with ImageDraw.ellipse (fill + one-pixel outline), then a
PIL GaussianBlur(1) is blended 50/50 with the sharp image. Both are measured in the same run.

    python benchmarks/bench_synth.py --count 4096 --baseline-count 1024
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import random
import time
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from twinvae.data.synthetic import SynthConfig, generate


def pil_baseline(config: SynthConfig, count: int, seed: int) -> np.ndarray:
    """Per-image, per-cell PIL drawing (the authors' approach), (count, H, W) uint8."""
    rng = random.Random(seed)
    size, m = config.image_size, config.margins
    counts = list(range(config.min_count, config.max_count + 1))
    weights = config.count_probabilities().tolist()
    background = Image.new("L", (size, size), round(config.background_grey))
    images = np.empty((count, size, size), dtype=np.uint8)
    for index in range(count):
        image = background.copy()
        draw = ImageDraw.Draw(image)
        placed: list[tuple[int, int, int]] = []
        for _ in range(rng.choices(counts, weights)[0]):
            radius = rng.randint(round(config.radius_px[0] + 0.5), round(config.radius_px[1] - 0.5))
            for _attempt in range(1000):
                x = rng.randint(m.left + radius, size - 1 - m.right - radius)
                y = rng.randint(m.top + radius, size - 1 - m.bottom - radius)
                if all(
                    (x - px) ** 2 + (y - py) ** 2 >= (radius + pr + 1 - config.overlap_px) ** 2
                    for px, py, pr in placed
                ):
                    break
            placed.append((x, y, radius))
            draw.ellipse(
                (x - radius, y - radius, x + radius, y + radius),
                fill=rng.randint(*config.fill_luminance),
                outline=rng.randint(*config.rim_luminance),
            )
        blurred = image.filter(ImageFilter.GaussianBlur(1))
        images[index] = np.asarray(Image.blend(image, blurred, config.blur_blend))
    return images


def images_per_second(run: Callable[[], object], count: int, repeat: int) -> tuple[float, float]:
    """Best of `repeat` runs: images per wall-clock second and per CPU second of this process.

    The machine is shared: the best run is the least disturbed one, and CPU time (all threads of
    this process) estimates the speed on an otherwise idle core."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return count / best_wall, count / best_cpu


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4096, help="images per generator run")
    parser.add_argument(
        "--baseline-count", type=int, default=1024, help="images per PIL baseline run"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument("--modalities", nargs="+", default=["bf", "pc"], choices=["bf", "pc"])
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="thread counts to measure"
    )
    parser.add_argument(
        "--natural", action="store_true", help="also measure the 'natural' rendering style"
    )
    args = parser.parse_args()

    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, ", end=""
    )
    print(f"numpy {np.__version__}, Pillow {Image.__version__}")
    print(
        f"{args.count} images per generator run, {args.baseline_count} per baseline run, ", end=""
    )
    print(f"best of {args.repeat}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'modality':8} {'generator':28} {'images/s':>10} {'per CPU-s':>10}")
    for modality in args.modalities:
        config = SynthConfig.for_modality(modality)
        generate(config, 64, seed=0)  # warm-up (imports, caches)
        styles = ["synthetic", "natural"] if args.natural else ["synthetic"]
        for style in styles:
            styled = SynthConfig.for_modality(modality, style=style)
            for workers in args.workers:
                run = functools.partial(generate, styled, args.count, 1, workers=workers)
                rate, cpu_rate = images_per_second(run, args.count, args.repeat)
                label = f"twinvae {style}, {workers} thread{'s' if workers > 1 else ''}"
                print(f"{modality:8} {label:28} {rate:10.0f} {cpu_rate:10.0f}")
        baseline = functools.partial(pil_baseline, config, args.baseline_count, 1)
        rate, cpu_rate = images_per_second(baseline, args.baseline_count, args.repeat)
        print(f"{modality:8} {'PIL per image (baseline)':28} {rate:10.0f} {cpu_rate:10.0f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
