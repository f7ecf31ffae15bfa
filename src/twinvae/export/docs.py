"""The bundle's documentation (README.md) and cover image."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twinvae.config import ExperimentConfig
from twinvae.data.imageset import IMAGE_SIZE
from twinvae.data.modality import generator_modality, modality_name, settings_modality
from twinvae.export.network import ARCHITECTURE_FILE, COUNT_ID, INPUT_ID, MU_ID, NetworkSpec
from twinvae.export.predict import CSV_COLUMNS
from twinvae.export.rdf import CITATIONS
from twinvae.runtime.twinvae_bundle import FULL_WEIGHTS_FILE


@dataclass
class DocContext:
    """Everything the documentation states about one bundle."""

    name: str
    bundle_file: str
    spec: NetworkSpec
    config: ExperimentConfig
    epoch: int
    source: str
    checkpoint_metrics: dict[str, float]
    extra_metrics: dict[str, float]
    extra_metrics_title: str
    check_origin: str
    check_image_count: int
    tolerance: float
    test_label: int
    test_prediction: float
    license: str
    authors: tuple[str, ...]
    twinvae_version: str
    notes: list[str] = field(default_factory=list)
    full_weights: bool = False
    """The bundle attaches the whole Twin-VAE (`FULL_WEIGHTS_FILE`) for fine-tuning."""


def _number(value: float) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def _metrics_table(title: str, metrics: dict[str, float]) -> list[str]:
    if not metrics:
        return []
    lines = [f"**{title}**", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {_number(metrics[key])} |" for key in sorted(metrics)]
    return [*lines, ""]


def _training_lines(config: ExperimentConfig, epoch: int) -> list[str]:
    data, model, loss, optim, train = (
        config.data,
        config.model,
        config.loss,
        config.optim,
        config.train,
    )
    natural = data.natural or f"{data.generated_natural_count} generated natural-style images"
    look = settings_modality(data.modality, data.synthetic_generator)
    borrowed = (
        f" with its {look.upper()} settings"
        if look is not None and generator_modality(data.modality) != look
        else ""
    )
    synthetic = (
        "none (natural only)"
        if data.natural_only
        else data.synthetic
        or f"generated on the fly by twinvae's synthetic cell generator{borrowed}"
    )
    lines = [
        f"- Run `{config.name}`, checkpoint of epoch {epoch} (of at most {train.epochs}).",
        f"- Modality: {modality_name(data.modality)} ({data.modality.upper()}); natural images: "
        f"{natural} (split `{data.natural_split}`, {data.val_fraction:.0%} of the labelled images "
        "held out for validation, cut by chamber position).",
        f"- Synthetic twin images: {synthetic}; {data.synthetic_ratio:g} synthetic per natural "
        "image.",
        f"- Model: base channels {model.base_channels}, latent size {model.latent_dim}, regressor "
        f"{list(model.regressor_hidden)} on the {model.regressor_input}, dropout {model.dropout}.",
        f"- Loss per domain: {loss.rec_weight:g} x reconstruction ({loss.reconstruction}) + "
        f"{loss.reg_weight:g} x count regression + {loss.kl_weight:g} x KL.",
        f"- Optimiser: {optim.optimizer}, learning rate {optim.lr:g} ({optim.schedule}), weight "
        f"decay {optim.weight_decay:g}; batch size {train.batch_size}; seed {train.seed}.",
        "- Augmentation: "
        + (
            f"flips, 90 degree rotations, rotations up to {config.augment.max_rotation_deg:g} "
            f"degrees, crops down to {config.augment.crop_scale:g}, noise std up to "
            f"{config.augment.noise_std:g}."
            if config.augment.enabled
            else "none."
        ),
    ]
    if config.transfer is not None and config.transfer.from_checkpoint:
        lines.append(
            f"- Transfer learning from `{config.transfer.from_checkpoint}` with strategy "
            f"`{config.transfer.strategy}`."
        )
    lines.append("- The full training configuration is attached as `config.yaml`.")
    return lines


def _fine_tuning_lines(ctx: DocContext) -> list[str]:
    """How to adapt the model to another microscope with a few labelled images."""
    command = (
        f"twinvae transfer --from {ctx.bundle_file} --config transfer-pc-to-bf "
        "--set data.natural=my_labelled_images/ --set data.modality=other --out runs/fine-tuned"
    )
    if ctx.full_weights:
        holds = (
            f"The bundle attaches the whole Twin-VAE as `{FULL_WEIGHTS_FILE}` (both encoders, "
            "both decoders, the shared layers and the regressor; the counting path in float32, "
            "the rest in float16), so that fine-tuning retrains it on the new natural images "
            "together with synthetic ones, as in the papers."
        )
    else:
        holds = (
            "The bundle holds only the counting path (no synthetic encoder, no decoders), so "
            "fine-tuning trains on the natural images alone (`--natural-only`; the decoders start "
            "untrained)."
        )
        command += " --natural-only"
    return [
        "## Fine-tuning",
        "",
        f"{holds} To fine-tune it for another microscope, give `twinvae transfer` a folder of its "
        "images with `counts.csv` (a few labelled ones suffice; `data.modality` names the "
        "microscope: `bf`, `pc`, `other` or a name of your own), then export the run's best "
        "checkpoint as a new bundle:",
        "",
        "```",
        command,
        "twinvae export runs/fine-tuned/best.pt --out fine-tuned.zip",
        "```",
        "",
    ]


def documentation(ctx: DocContext) -> str:
    """README.md of the bundle, with the `# Validation` section bioimage.io asks for."""
    modality = modality_name(ctx.config.data.modality)
    outputs = f"`{COUNT_ID}` (N, 1)" + (
        f" and `{MU_ID}` (N, {ctx.spec.model.latent_dim})" if ctx.spec.with_mu else ""
    )
    lines = [
        f"# {ctx.name}",
        "",
        f"Counts CHO-K1 suspension cells in {IMAGE_SIZE}x{IMAGE_SIZE} {modality} microscopy images "
        "of microfluidic single-cell cultivation chambers. The network is the natural-image path "
        "of a Twin-VAE: outer encoder, shared encoder, latent mean mu, count regressor. It is "
        "deterministic (no sampling) and was exported by twinvae "
        f"{ctx.twinvae_version} from `{ctx.source}`.",
        "",
        "## Input and output",
        "",
        f"- Input `{INPUT_ID}`: axes batch, channel (1, grey), y, x ({IMAGE_SIZE}x{IMAGE_SIZE}); "
        "the raw 8-bit grey values 0..255 as float32. The bundle's preprocessing "
        "(`ensure_dtype` float32, `scale_linear` gain 1/255) turns them into the [0, 1] images the "
        "network was trained on.",
        f"- Output {outputs}, float32. The count is a raw regression value: round it to an "
        "integer and clip it at 0.",
        "- The weight files themselves (`weights.onnx`, `weights_torchscript.pt`, `weights.pt` + "
        "`twinvae_counting_network.py`) expect images already divided by 255: when you run them "
        "directly, apply the preprocessing yourself.",
        "",
        "## Usage",
        "",
        "Python with bioimageio.core:",
        "",
        "```python",
        "import numpy as np",
        "from PIL import Image",
        "from bioimageio.core import load_model_description, predict",
        "",
        f'model = load_model_description("{ctx.bundle_file}")',
        'image = np.asarray(Image.open("cells.png").convert("L"), dtype=np.float32)  # 128 x 128',
        f'sample = predict(model=model, inputs={{"{INPUT_ID}": image[None, None]}})',
        f'count = float(sample.members["{COUNT_ID}"].data.squeeze())',
        "```",
        "",
        "The bioimageio command line:",
        "",
        "```",
        f"bioimageio test {ctx.bundle_file}",
        f"bioimageio predict {ctx.bundle_file} --inputs cells.png "
        "--outputs '{sample_id}_{output_id}.npy'",
        "```",
        "",
        "twinvae (ONNX Runtime, CUDA when available; files or folders; CSV with "
        f"`{','.join(CSV_COLUMNS)}`, chamber and frame read from microscope export names "
        "`<experiment>xy<position>t<frame>c1`, else empty):",
        "",
        "```",
        f"twinvae predict {ctx.bundle_file} cells/ --out counts.csv",
        f"twinvae validate {ctx.bundle_file}",
        "```",
        "",
        *_fine_tuning_lines(ctx),
        "KNIME: `twinvae knime build --bundle "
        f"{ctx.bundle_file} --out workflows/` writes KNIME workflows (count cells, growth curves, "
        "fine-tune) that ship this zip; the count and growth workflows' Python Script nodes run "
        "its ONNX weights with ONNX Runtime on 8-bit grey images, the fine-tune workflow runs "
        "`twinvae transfer` from it. With other KNIME ONNX or bioimage.io nodes, scale the "
        "images to [0, 1] first, as described above.",
        "",
        "## Training data and recipe",
        "",
        *_training_lines(ctx.config, ctx.epoch),
        "",
        "# Validation",
        "",
        "Validate the model on your own labelled images before relying on it: "
        f"`twinvae evaluate {ctx.bundle_file} --data <folder of images with counts.csv>` reports "
        "the mean absolute error (MAE), the mean relative error (MRE) and the share of exactly "
        "right rounded counts (accuracy), overall and per true count.",
        "",
        *_metrics_table("Metrics recorded with the checkpoint", ctx.checkpoint_metrics),
        *_metrics_table(ctx.extra_metrics_title, ctx.extra_metrics),
    ]
    if not ctx.checkpoint_metrics and not ctx.extra_metrics:
        lines += ["No metrics were recorded with this checkpoint.", ""]
    lines += [
        f"Export checks: ONNX, TorchScript and the state-dict weights agree with the PyTorch model "
        f"on {ctx.check_image_count} images ({ctx.check_origin}) within {ctx.tolerance:g} counts, "
        "and bioimage.io's own model test passed for every weight format (run "
        f"`twinvae validate {ctx.bundle_file} --trust-code` to repeat both; without "
        "`--trust-code` validate runs no Python file of the bundle, so it skips the state-dict "
        "weights, whose architecture is the Python file "
        f"`{ARCHITECTURE_FILE}`). Reproducibility tolerances for other machines are in "
        "`config.bioimageio.reproducibility_tolerance`.",
        "",
        f"Test image: label {ctx.test_label if ctx.test_label > 0 else 'unknown'}, predicted "
        f"{ctx.test_prediction:.2f}.",
        "",
        "## Limitations",
        "",
        f"- Only {IMAGE_SIZE}x{IMAGE_SIZE} 8-bit grey images; crop or resize larger images to one "
        "chamber first.",
        f"- Trained for {modality} images of CHO-K1 cells in microfluidic chambers with 1 to "
        f"{ctx.config.data.max_count} cells; other cell types, magnifications, modalities or "
        "denser chambers are out of scope and give unreliable counts.",
        "- The count is a regression output, not a detection: it gives no cell positions, and "
        "errors of about one cell are typical in crowded chambers.",
        "- Check a sample of predictions by eye for every new experiment.",
        *[f"- {note}" for note in ctx.notes],
        "",
        "## Citation",
        "",
        *[f"- {c['text']}. doi:{c['doi']}" for c in CITATIONS],
        "",
        "## Authors and license",
        "",
        f"Bundle authors: {', '.join(ctx.authors)}. License: {ctx.license}.",
        "",
    ]
    return "\n".join(lines)


def write_cover(path: Path, image: np.ndarray, predicted: float, label: int, modality: str) -> None:
    """A 2:1 PNG: the test image with its predicted count written on it, and a caption."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 3.0), dpi=100)
    FigureCanvasAgg(figure)
    left = figure.add_axes((0.0, 0.0, 0.5, 1.0))
    left.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    left.set_axis_off()
    left.text(
        0.04,
        0.96,
        f"{predicted:.1f}",
        transform=left.transAxes,
        va="top",
        ha="left",
        fontsize=22,
        color="yellow",
        fontweight="bold",
        bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"},
    )
    right = figure.add_axes((0.5, 0.0, 0.5, 1.0))
    right.set_axis_off()
    caption = [
        "Twin-VAE cell counting",
        f"CHO-K1, {modality_name(modality)}",
        "",
        f"predicted count: {predicted:.1f}",
        f"rounded: {max(0, math.floor(predicted + 0.5))}",
        f"label: {label}" if label > 0 else "label: unknown",
    ]
    right.text(0.06, 0.5, "\n".join(caption), va="center", ha="left", fontsize=12, linespacing=1.5)
    figure.savefig(path, format="png", metadata={"Software": None})
