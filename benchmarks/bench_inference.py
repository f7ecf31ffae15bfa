"""Inference speed of the exported counting network, and the time to export + validate a bundle.

Measures, in one run and on the same full-size network (random weights: speed does not depend
on them): PyTorch eager, TorchScript (the bundle's traced file) and ONNX Runtime (the bundle's
ONNX file, CPU provider) at batch 1 and batch 64, in images per second. Then exports one
checkpoint of that network as a bioimage.io bundle with every validation check.

    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --seconds 5 --skip-export
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from twinvae.config import ExperimentConfig
from twinvae.export.bundle import ExportOptions, export_bundle
from twinvae.export.formats import get_format
from twinvae.export.network import NetworkSpec, build_network, network_state
from twinvae.models.twin_vae import ModelConfig, TwinVAE
from twinvae.training.checkpoint import Checkpoint, save_checkpoint

Run = Callable[[np.ndarray], object]


def onnx_runner(path: Path, threads: int | None) -> Run:
    """An ONNX Runtime CPU session (default graph optimisations) with the given thread count."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return lambda x: session.run(None, {"raw": x})


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def images_per_second(
    runs: dict[str, Run], batch: np.ndarray, seconds: float
) -> dict[str, tuple[float, float]]:
    """(images per wall-clock second, images per CPU second of the process) for every runtime,
    measured interleaved (one call of each in turn) for about `seconds` per runtime, so that
    load changes on a shared machine hit all runtimes alike."""
    for run in runs.values():
        run(batch)  # warm-up
    wall = dict.fromkeys(runs, 0.0)
    cpu = dict.fromkeys(runs, 0.0)
    done = dict.fromkeys(runs, 0)
    deadline = time.perf_counter() + seconds * len(runs)
    while time.perf_counter() < deadline or min(done.values()) < 3 * len(batch):
        for name, run in runs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run(batch)
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - cpu_start
            done[name] += len(batch)
    return {name: (done[name] / wall[name], done[name] / cpu[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--skip-export", action="store_true", help="only measure inference")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and ONNX Runtime alike (default: their defaults, all cores)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model_config = ModelConfig()
    twin = TwinVAE(model_config).eval()
    spec = NetworkSpec(model_config)
    state = network_state(twin)
    network = build_network(spec, state)
    rng = np.random.default_rng(0)
    images = {n: rng.random((n, 1, 128, 128), dtype=np.float32) for n in (1, 64)}

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        example = torch.from_numpy(images[64][:2])
        entries = {
            name: get_format(name).write(network, spec, folder, example)
            for name in ("torchscript", "onnx")
        }
        runners: dict[str, Run] = {
            "PyTorch eager": lambda x: network(torch.from_numpy(x)),
            "TorchScript": get_format("torchscript").runner(folder, entries["torchscript"]),
            "ONNX Runtime (CPU)": onnx_runner(folder / entries["onnx"]["source"], args.threads),
        }
        with torch.no_grad():
            by_batch = {n: images_per_second(runners, x, args.seconds) for n, x in images.items()}
        results = {name: {n: by_batch[n][name] for n in images} for name in runners}

    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, ONNX Runtime "
        f"threads {args.threads or 'default'}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"network: base_channels {model_config.base_channels}, latent {model_config.latent_dim}, "
        f"{sum(p.numel() for p in network.parameters()) / 1e6:.2f} M parameters"
    )
    print(
        "| runtime | batch 1 images/s | batch 64 images/s "
        "| batch 1 per CPU-s | batch 64 per CPU-s |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, speeds in results.items():
        (wall1, cpu1), (wall64, cpu64) = speeds[1], speeds[64]
        print(f"| {name} | {wall1:.0f} | {wall64:.0f} | {cpu1:.0f} | {cpu64:.0f} |")
    eager = results["PyTorch eager"][64]
    for name in ("ONNX Runtime (CPU)", "TorchScript"):
        other = results[name][64]
        print(
            f"{name} / eager at batch 64: {other[0] / eager[0]:.2f}x wall, "
            f"{other[1] / eager[1]:.2f}x per CPU-s"
        )

    if args.skip_export:
        return
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "best.pt"
        save_checkpoint(
            Checkpoint(config=ExperimentConfig(model=model_config), model_state=twin.state_dict()),
            checkpoint,
        )
        start, cpu_start = time.perf_counter(), time.process_time()
        result = export_bundle(checkpoint, Path(scratch) / "bench.zip", ExportOptions())
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    slowest = sorted(result.report.checks, key=lambda c: c.seconds, reverse=True)[:3]
    print(
        f"export + full validation of one bundle: {total:.1f} s wall, {cpu:.1f} s CPU "
        f"(validation {result.report.seconds:.1f} s; slowest checks: "
        + ", ".join(f"{c.name} {c.seconds:.1f} s" for c in slowest)
        + ")"
    )


if __name__ == "__main__":
    main()
