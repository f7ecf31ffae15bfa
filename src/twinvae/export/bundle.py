"""Build a bioimage.io model bundle (zip) from a checkpoint, validate it, then write it.

The zip is built in a temporary folder next to the destination and only moved into place after
every check in :mod:`twinvae.export.checks` passed: a failed export leaves no file behind, and an
existing file is never replaced unless ``overwrite`` is set.

Reproducibility: the zip has fixed member order, timestamps and permissions, the description's
timestamp comes from the options (or SOURCE_DATE_EPOCH), and the ONNX, TorchScript and state-dict
files are written under fixed names, which makes them byte-identical for the same weights with the
same torch / onnx / onnxscript versions. The test outputs are computed by PyTorch on the exporting
machine, and their last bits depend on its CPU's kernels; `ExportOptions.recorded_outputs` ships
outputs recorded elsewhere instead (after checking that they agree within the bundle's tolerance),
which makes every member independent of the CPU (the model zoo does this).

No member names a folder of the exporting machine: absolute paths (the checkpoint, the training
config's data folders and transfer source, the check images) are shortened by `portable_path`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import tifffile
import torch
import yaml
from torch import nn

from twinvae import __version__
from twinvae.config import DataConfig, ExperimentConfig
from twinvae.data.modality import settings_modality
from twinvae.errors import ExportError
from twinvae.export import checks
from twinvae.export.docs import DocContext, documentation, write_cover
from twinvae.export.formats import FORMATS, PARENT_FORMAT, Runner
from twinvae.export.formats.base import as_output_list
from twinvae.export.full_weights import FULL_WEIGHTS_FILE, counting_state, write_full_weights
from twinvae.export.images import CheckImages, load_check_images, to_model_space
from twinvae.export.network import COUNT_ID, NetworkSpec, build_network, network_state
from twinvae.export.rdf import (
    CONFIG_FILE,
    COVER_FILE,
    DOCUMENTATION_FILE,
    RDF_NAME,
    SAMPLE_INPUT_FILE,
    TEST_INPUT_FILE,
    BundleMetadata,
    build_rdf,
    default_name,
    reproducibility_tolerances,
    sample_output_file,
    test_output_file,
)
from twinvae.fileio import sha256_file

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
COMPRESSED_SUFFIXES = frozenset({".yaml", ".md", ".py", ".json", ".txt"})
PORTABLE_PATH_PARTS = 3
"""Parts an absolute path keeps in a bundle: e.g. row or run folder, `run/`, checkpoint name."""
_DATA_PATH_FIELDS = ("natural", "synthetic", "cache_dir", "synthetic_background")


@dataclass
class ExportSource:
    """The weights of the counting path and what is known about how they were trained.

    ``full_state``: the whole Twin-VAE's state dict, attached to the bundle as
    `FULL_WEIGHTS_FILE` (what fine-tuning starts from); None for sources that hold only the
    counting path (the first zoo entries).
    """

    config: ExperimentConfig
    state: dict[str, torch.Tensor]
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    origin: str = ""
    full_state: dict[str, torch.Tensor] | None = None
    config_text: str | None = None
    """The config as stored (a zoo entry's YAML), shipped verbatim as config.yaml, so that new
    config fields with defaults do not change the bytes of a published bundle; None: written
    from ``config`` (with portable paths)."""


@dataclass
class ExportOptions:
    """How to export; metadata goes into rdf.yaml and the documentation."""

    with_mu: bool = False
    data: Path | None = None
    images: CheckImages | None = None
    """Check images to use as they are (instead of reading `data` or generating images)."""
    check_images: int = 16
    seed: int = 0
    tolerance: float = checks.DEFAULT_TOLERANCE
    overwrite: bool = False
    metadata: BundleMetadata = field(default_factory=BundleMetadata)
    recorded_outputs: dict[str, np.ndarray] | None = None
    """Test outputs (by output id) recorded when the model was published: shipped instead of the
    ones computed here, which must agree with them within the bundle's reproducibility
    tolerance (else the export fails naming the member and the difference)."""


@dataclass(frozen=True)
class OutputComparison:
    """A test output computed here against the recorded one, element by element within
    bioimage.io's `absolute_tolerance + relative_tolerance * |recorded|`."""

    member: str
    difference: float
    """|computed - recorded| at the element furthest beyond (or closest to) its tolerance."""
    tolerance: float
    """The tolerance of that element."""
    passed: bool

    def describe(self) -> str:
        return (
            f"{self.member}: max |difference| {self.difference:.2g} "
            f"(tolerance {self.tolerance:.2g})"
        )


@dataclass
class ExportResult:
    path: Path
    sha256: str
    report: checks.ValidationReport
    seconds: float
    test_prediction: float
    test_outputs: dict[str, np.ndarray] = field(default_factory=dict)
    """The test outputs the bundle holds (the recorded ones when given)."""
    output_comparisons: list[OutputComparison] = field(default_factory=list)
    """One per output when recorded outputs were given, else empty."""


def source_from_checkpoint(path: Path | str) -> ExportSource:
    """Load a checkpoint (file or run folder) and keep the natural counting path's weights."""
    from twinvae.training.checkpoint import load_model

    twin, checkpoint = load_model(path)
    return ExportSource(
        config=checkpoint.config,
        state=network_state(twin),
        epoch=checkpoint.epoch,
        metrics={k: float(v) for k, v in checkpoint.metrics.items() if _is_number(v)},
        origin=str(path),
        full_state={key: value.detach().cpu() for key, value in twin.state_dict().items()},
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_metrics_json(path: Path) -> dict[str, float]:
    """Metrics from JSON: a `twinvae evaluate --json` report (its `overall` metrics), or an
    object of metric name -> number (nested objects are flattened as `outer.inner`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object of metric name -> number")
    if isinstance(data.get("overall"), dict) and "predictions" in data:
        data = data["overall"]
    flat: dict[str, float] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{name}.", value)
            elif _is_number(value):
                flat[name] = float(value)
            else:
                raise ExportError(f"{path}: metric {name!r} is {value!r}, expected a number")

    walk("", data)
    return flat


def resolve_timestamp(timestamp: datetime | None) -> datetime:
    """The given time, else SOURCE_DATE_EPOCH (reproducible builds), else now; UTC, whole s."""
    if timestamp is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        timestamp = datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return timestamp.astimezone(UTC).replace(microsecond=0)


def write_reproducible_zip(folder: Path, target: Path) -> None:
    """Zip every file of folder (flat), rdf.yaml first, with fixed order, time and modes.

    Text is deflated; binary files (weights, arrays, images) are stored: float weights hardly
    compress, and every reader (bioimageio, KNIME) then loads them without inflating ~50 MB.
    """
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    names.sort(key=lambda name: name != RDF_NAME)
    with zipfile.ZipFile(target, "w") as archive:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            compress = Path(name).suffix in COMPRESSED_SUFFIXES
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, (folder / name).read_bytes(), compresslevel=6)


def portable_path(path: str | Path) -> str:
    """A path that names no folder of this machine, for bundle members and manifests.

    Relative paths stay as given; an absolute one keeps its last PORTABLE_PATH_PARTS parts after
    `.../` (e.g. `.../transfer-bf-to-pc/run/best.pt`), enough to tell runs apart.
    """
    pure = PurePath(path)
    if not pure.is_absolute():
        return str(path)
    tail = pure.relative_to(pure.anchor).parts[-PORTABLE_PATH_PARTS:]
    return "/".join(("...", *tail))


def _portable_data(data: DataConfig) -> DataConfig:
    updates = {
        key: portable_path(value)
        for key in _DATA_PATH_FIELDS
        if isinstance(value := getattr(data, key), str) and PurePath(value).is_absolute()
    }
    return data.model_copy(update=updates) if updates else data


def portable_config(config: ExperimentConfig) -> ExperimentConfig:
    """The config with its absolute paths (data folders, transfer source) made portable; a copy
    for the bundle (config.yaml, README.md), not for training."""
    updates: dict[str, Any] = {"data": _portable_data(config.data)}
    transfer = config.transfer
    if transfer is not None:
        transfer_updates: dict[str, Any] = {}
        if transfer.from_checkpoint is not None:
            transfer_updates["from_checkpoint"] = portable_path(transfer.from_checkpoint)
        if transfer.second_stage is not None:
            stage = transfer.second_stage
            transfer_updates["second_stage"] = stage.model_copy(
                update={"data": _portable_data(stage.data)}
            )
        updates["transfer"] = transfer.model_copy(update=transfer_updates)
    return config.model_copy(update=updates)


def compare_test_outputs(
    computed: dict[str, np.ndarray], recorded: dict[str, np.ndarray]
) -> list[OutputComparison]:
    """Each computed test output against the recorded one, within the tolerance the bundle
    declares for the recorded outputs (rdf.yaml's reproducibility_tolerance)."""
    missing = sorted(set(computed) - set(recorded))
    if missing:
        raise ExportError(
            f"no recorded test output for {', '.join(missing)} (recorded: "
            f"{', '.join(sorted(recorded)) or 'none'}); record the outputs of this network"
        )
    shaped: dict[str, np.ndarray] = {}
    for output_id, values in computed.items():
        expected = np.asarray(recorded[output_id], dtype=np.float32)
        if expected.size != values.size:
            raise ExportError(
                f"{test_output_file(output_id)}: {expected.size} recorded values, the network "
                f"gives {values.size}; record the outputs of this network"
            )
        shaped[output_id] = expected.reshape(values.shape)
    tolerances = {t["output_ids"][0]: t for t in reproducibility_tolerances(shaped)}
    comparisons = []
    for output_id, values in computed.items():
        expected = shaped[output_id].astype(np.float64)
        tolerance = tolerances[output_id]
        difference = np.abs(values.astype(np.float64) - expected).reshape(-1)
        allowed = (
            tolerance["absolute_tolerance"] + tolerance["relative_tolerance"] * np.abs(expected)
        ).reshape(-1)
        excess = np.where(np.isnan(difference), np.inf, difference - allowed)
        worst = int(np.argmax(excess))
        comparisons.append(
            OutputComparison(
                member=test_output_file(output_id),
                difference=float(difference[worst]),
                tolerance=float(allowed[worst]),
                passed=bool(np.all(difference <= allowed)),
            )
        )
    return comparisons


def _reference_runner(network: nn.Module) -> Runner:
    def run(images: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return as_output_list(network(torch.from_numpy(np.ascontiguousarray(images))))

    return run


@dataclass
class PackageFolder:
    """What build_package_folder wrote, and what the checks of the bundle need."""

    reference: Runner
    """The PyTorch model the bundle's weights are compared with."""
    model_images: np.ndarray
    test_outputs: dict[str, np.ndarray]
    output_comparisons: list[OutputComparison]

    @property
    def prediction(self) -> float:
        return float(self.test_outputs[COUNT_ID].reshape(-1)[0])


def _shipped_test_outputs(
    computed: dict[str, np.ndarray], recorded: dict[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], list[OutputComparison]]:
    """The computed outputs, or the recorded ones after checking them against the computed."""
    if recorded is None:
        return computed, []
    comparisons = compare_test_outputs(computed, recorded)
    failed = [c for c in comparisons if not c.passed]
    if failed:
        raise ExportError(
            "; ".join(c.describe() for c in failed)
            + ": the test output computed here is not the recorded one within the bundle's "
            "reproducibility tolerance (changed weights, or another torch version with other "
            "numerics); if the change is intended, publish the model again (`twinvae zoo add "
            "--replace`)"
        )
    shipped = {
        output_id: np.asarray(recorded[output_id], dtype=np.float32).reshape(values.shape)
        for output_id, values in computed.items()
    }
    return shipped, comparisons


def _check_full_state(source: ExportSource) -> None:
    """The attached Twin-VAE must hold exactly the counting network the bundle ships."""
    assert source.full_state is not None
    attached = counting_state(source.full_state, source.config.model)
    differing = sorted(
        key
        for key in source.state.keys() | attached.keys()
        if key not in attached
        or key not in source.state
        or not torch.equal(attached[key], source.state[key].to("cpu"))
    )
    if differing:
        raise ExportError(
            f"{source.origin or 'the source'}: the whole Twin-VAE's weights differ from the "
            f"counting network's in {', '.join(differing[:5])}"
        )


def build_package_folder(
    source: ExportSource,
    folder: Path,
    options: ExportOptions,
    images: CheckImages,
    bundle_file: str,
) -> PackageFolder:
    """Write every bundle file and rdf.yaml into folder."""
    spec = NetworkSpec(source.config.model, with_mu=options.with_mu)
    network = build_network(spec, source.state)
    reference = _reference_runner(network)
    model_images = to_model_space(images.images)
    raw_test = images.images[:1, None].astype(np.float32)
    computed = dict(zip(spec.output_ids, reference(model_images[:1]), strict=True))
    test_outputs, comparisons = _shipped_test_outputs(computed, options.recorded_outputs)
    config = portable_config(source.config)
    origin = portable_path(source.origin) if source.origin else "a twinvae checkpoint"

    if source.full_state is not None:
        _check_full_state(source)
        write_full_weights(folder / FULL_WEIGHTS_FILE, source.full_state, source.config.model)
    np.save(folder / TEST_INPUT_FILE, raw_test, allow_pickle=False)
    tifffile.imwrite(folder / SAMPLE_INPUT_FILE, images.images[0])
    for output_id, values in test_outputs.items():
        np.save(folder / test_output_file(output_id), values, allow_pickle=False)
        tifffile.imwrite(folder / sample_output_file(output_id), values)

    # batch 2 so that tracing and export cannot specialise the batch size to 1
    example = torch.from_numpy(np.ascontiguousarray(model_images[:2]))
    if example.shape[0] < 2:
        example = torch.cat([example, example])
    weights: dict[str, dict[str, Any]] = {}
    for weight_format in FORMATS:
        entry = weight_format.write(network, spec, folder, example)
        if weight_format.name != PARENT_FORMAT:
            entry["parent"] = PARENT_FORMAT
        weights[weight_format.name] = entry

    metadata = options.metadata
    name = metadata.name or default_name(config.data.modality)
    prediction = float(test_outputs[COUNT_ID].reshape(-1)[0])
    label = int(images.counts[0])
    if source.config_text is not None:
        (folder / CONFIG_FILE).write_text(source.config_text, encoding="utf-8")
    else:
        config.save(folder / CONFIG_FILE)
    write_cover(folder / COVER_FILE, images.images[0], prediction, label, config.data.modality)
    (folder / DOCUMENTATION_FILE).write_text(
        documentation(
            DocContext(
                name=name,
                bundle_file=bundle_file,
                spec=spec,
                config=config,
                epoch=source.epoch,
                source=origin,
                checkpoint_metrics=source.metrics,
                extra_metrics=metadata.extra_metrics,
                extra_metrics_title=metadata.metrics_title,
                check_origin=portable_path(images.origin),
                check_image_count=len(images),
                tolerance=options.tolerance,
                test_label=label,
                test_prediction=prediction,
                license=metadata.license,
                authors=metadata.authors,
                twinvae_version=__version__,
                notes=[]
                if not images.generated
                else ["The export checks ran on generated images, not on real labelled ones."],
                full_weights=source.full_state is not None,
            )
        ),
        encoding="utf-8",
    )

    hashes = {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()}
    for entry in weights.values():
        entry["sha256"] = hashes[entry["source"]]
        architecture = entry.get("architecture")
        if isinstance(architecture, dict):
            architecture["sha256"] = hashes[architecture["source"]]
    rdf = build_rdf(
        spec=spec,
        config=config,
        metadata=metadata,
        hashes=hashes,
        weights=weights,
        test_outputs=test_outputs,
        parameter_count=sum(p.numel() for p in network.parameters()),
        epoch=source.epoch,
        timestamp=resolve_timestamp(metadata.timestamp),
        twinvae_info={"twinvae_version": __version__, "exported_from": origin},
    )
    (folder / RDF_NAME).write_text(
        yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True, width=100), encoding="utf-8"
    )
    return PackageFolder(reference, model_images, test_outputs, comparisons)


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.suffix.lower() != ".zip":
        raise ExportError(f"{out}: the bundle file name must end in .zip")
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; give the path of the .zip to write")
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: file exists; choose another name or pass --overwrite")


def _move_into_place(built: Path, out: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(built, out)
        return
    try:
        os.link(built, out)  # fails if out appeared meanwhile: never clobber
    except FileExistsError:
        raise ExportError(f"{out}: file exists; choose another name or pass --overwrite") from None
    except OSError:
        if out.exists():
            raise ExportError(
                f"{out}: file exists; choose another name or pass --overwrite"
            ) from None
        os.replace(built, out)


def export_source(
    source: ExportSource,
    out: Path | str,
    options: ExportOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Build, validate and write the bundle of `source` to `out` (a .zip path)."""
    options = options or ExportOptions()
    out = Path(out)
    _check_destination(out, options.overwrite)
    start = time.perf_counter()
    say = progress or (lambda _message: None)
    say("choosing test images")
    images = options.images
    if images is None:
        data = source.config.data
        images = load_check_images(
            options.data,
            data.modality,
            options.check_images,
            options.seed,
            look=settings_modality(data.modality, data.synthetic_generator),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", suffix=".export", dir=out.parent))
    try:
        folder = scratch / "bundle"
        folder.mkdir()
        say("writing weights (state dict, TorchScript, ONNX), docs and cover")
        package = build_package_folder(source, folder, options, images, out.name)
        built = scratch / out.name
        write_reproducible_zip(folder, built)
        report = checks.validate_bundle(
            built,
            images=package.model_images,
            labels=images.counts,
            reference=package.reference,
            tolerance=options.tolerance,
            trust_code=True,  # the architecture file is twinvae's own, written just now
            progress=lambda name: say(f"check: {name}"),
        )
        checks.require_valid(report)
        digest = sha256_file(built)
        _move_into_place(built, out, options.overwrite)
        report.bundle = out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult(
        path=out,
        sha256=digest,
        report=report,
        seconds=time.perf_counter() - start,
        test_prediction=package.prediction,
        test_outputs=package.test_outputs,
        output_comparisons=package.output_comparisons,
    )


def export_bundle(
    checkpoint: Path | str,
    out: Path | str,
    options: ExportOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """`twinvae export`: checkpoint (file or run folder) -> validated bundle zip at `out`."""
    options = options or ExportOptions()
    _check_destination(Path(out), options.overwrite)
    return export_source(source_from_checkpoint(checkpoint), out, options, progress)
