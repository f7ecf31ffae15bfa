"""The main job on generated data: data, train, evaluate, export, predict, KNIME."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinvae.data.imageset import ImageSet
from twinvae.errors import DataError

MARKER = ".twinvae-demo"
FRAMES_PER_CHAMBER = 20


@dataclass
class DemoStep:
    name: str
    output: str
    seconds: float
    detail: str = ""


@dataclass
class DemoResult:
    out: Path
    steps: list[DemoStep] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _as_time_lapse(image_set: ImageSet, experiment: str, first_chamber: int) -> ImageSet:
    """Rename generated images like microscope exports (<exp>xy<pos>t<frame>c1.png)."""
    image_set.names = [
        f"{experiment}xy{first_chamber + i // FRAMES_PER_CHAMBER:02d}"
        f"t{i % FRAMES_PER_CHAMBER + 1:03d}c1.png"
        for i in range(len(image_set))
    ]
    return image_set


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless it is an earlier demo's and --overwrite was given."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DataError(f"{out}: folder is not empty and was not made by twinvae demo")
        if not overwrite:
            raise DataError(f"{out}: holds an earlier demo; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by twinvae demo; --overwrite may replace this folder\n")


def generate_demo_data(out: Path, modality: str, seed: int) -> dict[str, Path]:
    """Natural-looking train (few labels) and test sets, and synthetic samples, as folders."""
    from twinvae.data.synthetic import SynthConfig, generate
    from twinvae.data.writer import write_image_folder

    natural = SynthConfig.for_modality(modality, style="natural")  # type: ignore[arg-type]
    train = _as_time_lapse(generate(natural, 600, seed=seed), "demo", 1)
    train.counts[150:] = 0  # few labels, as in the real data
    test = _as_time_lapse(generate(natural, 160, seed=seed + 1), "demo", 31)
    synthetic = generate(SynthConfig.for_modality(modality), 200, seed=seed + 2)  # type: ignore[arg-type]
    folders = {
        "natural": out / "data" / "natural-train",
        "natural_test": out / "data" / "natural-test",
        "synthetic": out / "data" / "synthetic",
    }
    write_image_folder(train, folders["natural"])
    write_image_folder(test, folders["natural_test"])
    write_image_folder(synthetic, folders["synthetic"])
    return folders


def run_demo(
    out: Path,
    *,
    modality: str = "pc",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    overrides: list[str] | None = None,
    report: Callable[[DemoStep], None] | None = None,
) -> DemoResult:
    """Run every stage; each one's output lands under ``out``."""
    from twinvae.config import load_config
    from twinvae.data.readers import read_image_folder
    from twinvae.evaluation.evaluate import evaluate
    from twinvae.export.bundle import ExportOptions, export_bundle
    from twinvae.export.predict import predict_to_csv
    from twinvae.knime.builders import build_workflows
    from twinvae.training.trainer import train

    prepare_out_dir(out, overwrite)
    result = DemoResult(out=out)

    def step(name: str, output: Path, started: float, detail: str = "") -> None:
        seconds = time.perf_counter() - started
        done = DemoStep(name, str(output.relative_to(out.parent)), seconds, detail)
        result.steps.append(done)
        if report is not None:
            report(done)

    started = time.perf_counter()
    folders = generate_demo_data(out, modality, seed)
    step(
        "generate data",
        out / "data",
        started,
        "600 natural-style (150 labelled), 160 test, 200 synthetic",
    )

    started = time.perf_counter()
    config = load_config(
        "quick-cpu",
        [f"data.natural={folders['natural']}", f"data.modality={modality}", *(overrides or [])],
    )
    run = train(config, out / "run", progress=progress)
    step("train quick-cpu", run.run_dir, started, f"best validation MAE {run.best_val_mae:.2f}")

    started = time.perf_counter()
    test_set = read_image_folder(folders["natural_test"])
    evaluation: dict[str, Any] = evaluate(run.best_checkpoint, test_set)
    result.metrics = evaluation["overall"]
    step("evaluate", out / "run" / "best.pt", started, _metrics_text(result.metrics))

    started = time.perf_counter()
    bundle = out / f"twinvae-demo-{modality}.zip"
    export_bundle(run.best_checkpoint, bundle, ExportOptions(data=folders["natural_test"]))
    step(
        "export + validate bundle",
        bundle,
        started,
        "ONNX, TorchScript, state dict; bioimageio test passed",
    )

    started = time.perf_counter()
    counts_csv = out / "counts.csv"
    predict_to_csv(bundle, [folders["natural_test"]], counts_csv)
    step("predict", counts_csv, started, f"{len(test_set)} images")

    started = time.perf_counter()
    samples = out / "knime-samples"
    samples.mkdir()
    for name in sorted(test_set.names)[:12]:
        shutil.copy2(folders["natural_test"] / name, samples / name)
    knime_dir = out / "knime"
    build_workflows(knime_dir, bundle=bundle, samples=samples, knwf=True)
    step("KNIME workflows", knime_dir, started, "TwinVAE_Count_Cells.knwf ready to import")
    return result


def _metrics_text(metrics: dict[str, float]) -> str:
    return (
        f"MAE {metrics['mae']:.2f}, MRE {100 * metrics['mre']:.1f} %, "
        f"accuracy {100 * metrics['accuracy']:.1f} %"
    )
