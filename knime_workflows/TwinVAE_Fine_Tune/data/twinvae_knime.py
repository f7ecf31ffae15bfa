"""The logic behind the Python Script nodes of the twinvae KNIME workflows.

Each node script only finds the workflow's ``data/`` folder, puts it on ``sys.path`` and calls one
function here with the node's input table and the workflow variables. Paths in workflow variables
may be absolute, relative to the workflow folder, or KNIME URLs of the form
``knime://knime.workflow/...``.

A workflow ships only the modules its nodes use: this one in every workflow, ``twinvae_bundle``
(the bundle opener and ONNX runner) in all three, ``twinvae_growth`` in the growth workflow and
``twinvae_finetune`` in the fine-tune workflow. So those three are imported by the functions that
need them (``shipped``), not when this module is imported.
"""

from __future__ import annotations

import importlib
import io
import math
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

try:
    import numpy as np
    import pandas as pd
except ImportError as error:  # pragma: no cover - depends on the user's environment
    missing = getattr(error, "name", None) or "pandas"
    raise ImportError(
        f"The Python package '{missing}' is missing. Install it with 'pip install {missing}' or "
        f"'conda install -c conda-forge {missing}' into the Python environment that KNIME uses "
        "(Preferences > KNIME > Python)."
    ) from error

if TYPE_CHECKING:
    from twinvae.knime.scripts import twinvae_finetune
    from twinvae.runtime import twinvae_bundle

PACKAGE_HOMES = {
    "twinvae_bundle": "twinvae.runtime.twinvae_bundle",
    "twinvae_growth": "twinvae.knime.scripts.twinvae_growth",
    "twinvae_finetune": "twinvae.knime.scripts.twinvae_finetune",
}
"""Where the modules shipped next to this one live inside the twinvae package."""

WORKFLOW_URL = "knime://knime.workflow/"
THUMBNAIL_SIZE = 64

Variables = Mapping[str, Any]


def shipped(name: str) -> ModuleType:
    """A module shipped next to this one: a sibling in the workflow's data/ folder, or its
    home in the twinvae package when this module is imported from there."""
    if __package__:
        return importlib.import_module(PACKAGE_HOMES[name])
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise
        raise ModuleNotFoundError(
            f"{name}.py is missing from the workflow's data folder; regenerate the workflow with "
            "'twinvae knime build'",
            name=name,
        ) from error


def _bundle() -> ModuleType:
    return shipped("twinvae_bundle")


# -- workflow variables and paths -----------------------------------------------------------------


def text_variable(variables: Variables, name: str, required: bool = True) -> str:
    """A string workflow variable; a clear error when a required one is missing or empty."""
    value = variables.get(name)
    text = "" if value is None else str(value).strip()
    if required and not text:
        raise ValueError(
            f"The workflow variable '{name}' is empty. Set it in KNIME: right-click the workflow "
            "in the KNIME Explorer > Workflow Variables..., or pass "
            f"-workflow.variable={name},<value>,String in batch mode."
        )
    return text


def number_variable(variables: Variables, name: str, default: float) -> float:
    value = variables.get(name, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"The workflow variable '{name}' must be a number, got {value!r}"
        ) from None
    if math.isnan(number):
        raise ValueError(f"The workflow variable '{name}' must be a number, got NaN")
    return number


def resolve_path(value: str, workflow_dir: Path) -> Path:
    """Absolute path for a workflow variable value (absolute, workflow-relative or knime:// URL)."""
    text = value.strip()
    if text.startswith(WORKFLOW_URL):
        return (workflow_dir / text[len(WORKFLOW_URL) :]).resolve()
    if text.startswith("knime://"):
        raise ValueError(
            f"{text!r}: only knime://knime.workflow/... URLs are understood here; use a local "
            "file system path for other locations"
        )
    if text.startswith("file://"):
        text = text[len("file://") :]
    path = Path(text).expanduser()
    return (path if path.is_absolute() else workflow_dir / path).resolve()


def path_variable(variables: Variables, name: str, workflow_dir: Path) -> Path:
    return resolve_path(text_variable(variables, name), workflow_dir)


# -- counting -------------------------------------------------------------------------------------


def find_images(
    variables: Variables, workflow_dir: Path, folder_variable: str = "image_folder"
) -> Any:
    """Table of the images in the folder named by a workflow variable: file, path."""
    folder = path_variable(variables, folder_variable, workflow_dir)
    bundle = _bundle()
    paths = bundle.list_images(folder)
    if not paths:
        raise ValueError(
            f"No images ({', '.join(bundle.IMAGE_SUFFIXES)}) found in {folder} "
            f"(workflow variable '{folder_variable}')."
        )
    return pd.DataFrame(
        {
            "file": [path.relative_to(folder).as_posix() for path in paths],
            "path": [str(path) for path in paths],
        }
    )


def load_predictor(variables: Variables, workflow_dir: Path) -> twinvae_bundle.BundlePredictor:
    """The ONNX predictor of the bundle named by the workflow variable 'bundle'."""
    path = path_variable(variables, "bundle", workflow_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"No model bundle at {path}. Set the workflow variable 'bundle' to a bioimage.io "
            "model bundle (.zip) made by 'twinvae export', or rebuild this workflow with "
            "'twinvae knime build --bundle <model.zip>' so that data/model.zip exists."
        )
    batch_size = int(number_variable(variables, "batch_size", 64))
    predictor: twinvae_bundle.BundlePredictor = _bundle().BundlePredictor(
        path, batch_size=max(1, batch_size)
    )
    return predictor


def png_cells_supported() -> bool:
    """True when this KNIME turns PIL images in a pandas column into PNG image cells."""
    try:
        builtin = importlib.import_module("knime.types.builtin")
    except ImportError:
        return False
    return hasattr(builtin, "PNGImageValueFactory")


def thumbnail_cells(images: Any, as_pil: bool) -> list[Any]:
    """Small PNG thumbnails: PIL images (KNIME PNG cells) or raw PNG bytes (older KNIME)."""
    bundle = _bundle()
    image_module = bundle.require("PIL.Image")
    cells: list[Any] = []
    for image in images:
        small = image_module.fromarray(np.asarray(image, dtype=np.uint8)).resize(
            (THUMBNAIL_SIZE, THUMBNAIL_SIZE), image_module.BILINEAR
        )
        cells.append(small if as_pil else bundle.png_bytes(np.asarray(small)))
    return cells


def rounded_counts(counts: Any) -> Any:
    """Counts rounded half up (2.5 -> 3) as int64, the rounding of 'twinvae predict'."""
    return np.floor(np.asarray(counts, dtype=np.float64) + 0.5).astype(np.int64)


def count_cells(
    table: Any,
    variables: Variables,
    workflow_dir: Path,
    thumbnails: bool = True,
    png_cells: bool | None = None,
) -> Any:
    """Add count, count_rounded (and a thumbnail) to a table with a 'path' column."""
    if "path" not in table.columns:
        raise ValueError("The input table needs a 'path' column with image files.")
    predictor = load_predictor(variables, workflow_dir)
    paths = [str(path) for path in table["path"]]
    counts = np.empty(len(paths), dtype=np.float64)
    thumbs: list[Any] = []
    as_pil = png_cells_supported() if png_cells is None else png_cells
    step = predictor.batch_size
    for start in range(0, len(paths), step):
        images = predictor.read_images(paths[start : start + step])
        counts[start : start + len(images)] = predictor.predict_arrays(images)
        if thumbnails:
            thumbs += thumbnail_cells(images, as_pil)
        print(f"counted {min(start + step, len(paths))}/{len(paths)} images", flush=True)
    result = table.drop(columns=["path"]).reset_index(drop=True)
    result["count"] = counts
    result["count_rounded"] = rounded_counts(counts)
    if thumbnails:
        result["thumbnail"] = thumbs
        if not as_pil:
            print("This KNIME version has no PNG cells from Python: 'thumbnail' holds PNG bytes.")
    return result


def count_histogram_png(counts: Any, title: str = "Predicted cells per image") -> bytes:
    """Bar chart of how many images have 0, 1, 2, ... cells (rounded counts)."""
    plt = _pyplot()
    values = np.maximum(rounded_counts(counts), 0)  # negative predictions count as 0 here
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    if len(values):
        frequencies = np.bincount(values)
        axis.bar(np.arange(len(frequencies)), frequencies, width=0.8, color="#4a7ab5")
        axis.set_title(f"{title} (n = {len(values)}, mean = {np.mean(counts):.2f})", fontsize=10)
    else:
        axis.set_title(f"{title} (no images)", fontsize=10)
    axis.set_xlabel("cells (rounded prediction)")
    axis.set_ylabel("images")
    figure.tight_layout()
    return _png(figure, plt)


def _pyplot() -> Any:
    matplotlib = _bundle().require("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _png(figure: Any, plt: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def write_results(
    table: Any, variables: Variables, workflow_dir: Path, plot: bytes | None = None
) -> Path | None:
    """Save the table as CSV (and a plot as PNG next to it) when 'results_csv' is set.

    Existing files are replaced only when the workflow variable 'overwrite_results' is 1.
    """
    value = text_variable(variables, "results_csv", required=False)
    if not value:
        return None
    target = resolve_path(value, workflow_dir)
    targets = [target] + ([target.with_suffix(".png")] if plot is not None else [])
    existing = [path for path in targets if path.exists()]
    if existing and number_variable(variables, "overwrite_results", 0) != 1:
        raise FileExistsError(
            f"{existing[0]} exists already (workflow variable 'results_csv'); delete it, choose "
            "another file name, or set the workflow variable 'overwrite_results' to 1"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    table.drop(columns=[c for c in ("thumbnail",) if c in table.columns]).to_csv(
        target, index=False
    )
    if plot is not None:
        target.with_suffix(".png").write_bytes(plot)
    print(f"results written to {target}")
    return target


# -- growth curves --------------------------------------------------------------------------------


def find_time_lapse(variables: Variables, workflow_dir: Path) -> Any:
    """Images of a time-lapse with chamber and frame (from the names, or from a position table)."""
    table_value = text_variable(variables, "position_table", required=False)
    if table_value:
        growth = shipped("twinvae_growth")
        positions = growth.read_position_table(resolve_path(table_value, workflow_dir))
        folder = path_variable(variables, "time_lapse_folder", workflow_dir)
        positions.insert(1, "path", [str((folder / file).resolve()) for file in positions["file"]])
        missing = [path for path in positions["path"] if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} files of the position table are missing, e.g. {missing[0]}"
            )
        return positions
    images = find_images(variables, workflow_dir, "time_lapse_folder")
    frames = shipped("twinvae_growth").time_lapse_table(images["file"])
    return frames.merge(images, on="file", how="left")[
        ["file", "path", "experiment", "position", "frame", "chamber"]
    ]


def chamber_counts(counts: Any) -> Any:
    """Counts summed per chamber and frame: chamber, frame, count, images."""
    return shipped("twinvae_growth").chamber_counts(counts)


def growth_fits(counts: Any, variables: Variables) -> tuple[Any, bytes]:
    """Fitted growth per chamber and the growth-curve plot."""
    growth = shipped("twinvae_growth")
    interval = number_variable(variables, "frame_interval_minutes", 0.0)
    fits = growth.fit_all(counts, interval if interval > 0 else None)
    return fits, growth.growth_plot_png(counts, fits)


# -- fine-tuning ----------------------------------------------------------------------------------


def finetune_settings(
    variables: Variables, workflow_dir: Path
) -> twinvae_finetune.FineTuneSettings:
    """The fine-tune inputs from the workflow variables; whether the bundle attaches the whole
    Twin-VAE decides between fine-tuning with the synthetic twin and --natural-only."""
    finetune = shipped("twinvae_finetune")
    bundle = path_variable(variables, "bundle", workflow_dir)
    config = text_variable(variables, "config", required=False)
    if config.endswith((".yaml", ".yml")) or "/" in config or "\\" in config:
        config = str(resolve_path(config, workflow_dir))  # a file; else a builtin config name
    extra = text_variable(variables, "extra_settings", required=False)
    settings: twinvae_finetune.FineTuneSettings = finetune.FineTuneSettings(
        twinvae=finetune.find_twinvae(
            text_variable(variables, "twinvae_executable", required=False)
        ),
        bundle=bundle,
        new_labels_dir=path_variable(variables, "new_labels_dir", workflow_dir),
        heldout_dir=path_variable(variables, "heldout_dir", workflow_dir),
        run_dir=path_variable(variables, "run_dir", workflow_dir),
        new_bundle=path_variable(variables, "new_bundle", workflow_dir),
        modality=text_variable(variables, "modality", required=False) or "other",
        strategy=text_variable(variables, "strategy", required=False) or "thaw",
        config=config,
        natural_only=bundle.exists() and not bundle_has_full_weights(bundle),
        settings=tuple(item for item in extra.replace(";", " ").split() if item),
    )
    return settings


def bundle_has_full_weights(bundle: Path) -> bool:
    """Whether the bundle attaches the whole Twin-VAE (read with the checked opener)."""
    runtime = _bundle()
    return bool(runtime.has_full_weights(runtime.read_bundle_info(bundle)))


LOG_COLUMNS = ["step", "command", "status", "seconds", "output"]


def finetune_plan(variables: Variables, workflow_dir: Path) -> Any:
    """Check the inputs and list the three command lines (status 'planned')."""
    finetune = shipped("twinvae_finetune")
    settings = finetune_settings(variables, workflow_dir)
    finetune.check_inputs(settings)
    if settings.natural_only:
        print(
            f"{settings.bundle} holds only the counting path (no twinvae_weights.safetensors): "
            "it is fine-tuned on the natural images alone (--natural-only)"
        )
    rows = [
        {
            "step": step.name,
            "command": step.command_line,
            "status": "planned",
            "seconds": 0.0,
            "output": "",
        }
        for step in finetune.build_steps(settings)
    ]
    return pd.DataFrame(rows, columns=LOG_COLUMNS)


def finetune_run(step_name: str, log: Any, variables: Variables, workflow_dir: Path) -> Any:
    """Run one planned step and mark it done in the log table."""
    finetune = shipped("twinvae_finetune")
    settings = finetune_settings(variables, workflow_dir)
    steps = {step.name: step for step in finetune.build_steps(settings)}
    if step_name not in steps:
        raise ValueError(f"unknown step {step_name!r}; known: {sorted(steps)}")
    result = finetune.run_step(steps[step_name])
    updated = log.copy()
    row = updated["step"] == step_name
    updated.loc[row, "status"] = "done"
    updated.loc[row, "seconds"] = round(result.seconds, 3)
    updated.loc[row, "output"] = result.output[-finetune.OUTPUT_TAIL_CHARS :]
    return updated


def finetune_metrics(variables: Variables, workflow_dir: Path) -> Any:
    """metric, value (number or missing), text table from the evaluate step's JSON report."""
    finetune = shipped("twinvae_finetune")
    settings = finetune_settings(variables, workflow_dir)
    pairs = finetune.flatten_metrics(finetune.read_metrics(settings.metrics))
    return pd.DataFrame(
        {
            "metric": [name for name, _ in pairs],
            "value": [_metric_number(value) for _, value in pairs],
            "text": ["" if value is None else str(value) for _, value in pairs],
        }
    )


def _metric_number(value: Any) -> float:
    if isinstance(value, bool | int | float):
        return float(value)
    return math.nan
