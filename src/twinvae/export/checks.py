"""Validation of a twinvae bioimage.io bundle (zip): every check export runs before writing.

Checks, in order (a failed package check stops the rest):

1. package      the zip passes the runtime's bundle opener (safe member names, no links, no
                duplicates, bounded sizes) and rdf.yaml is at its top level
2. files        every file rdf.yaml names is in the zip and matches its sha256
3. contract     input `raw` (batch, 1 channel, 128 x 128, /255 preprocessing), output `count`
                (batch, 1), the three weight formats with pytorch_state_dict as parent
4. bioimageio format   bioimageio.spec validates the description (with file checks)
5. onnx         ONNX checker, opset >= 17, one self-contained file, dynamic batch axis
6. agreement    every weight format gives the reference's outputs within the tolerance on the
                check images, and the reference reproduces the bundle's test output
   full weights the attached whole Twin-VAE (``twinvae_weights.safetensors``, what fine-tuning
                starts from) loads into twinvae's own TwinVAE and its counting path reproduces
                the test output within the tolerance rdf.yaml declares (skipped for bundles
                without it)
7. prediction spread   the counts of the ONNX weights on the check images (or, without any,
                on generated images of the bundle's modality) are not (almost) constant; a flat
                model passes with an alert (`SPREAD_MIN_STD`, `SPREAD_MIN_FRACTION`)
8. bioimageio.core test (<format>), one per weight format: bioimage.io's own model test

Running code from a bundle: the ONNX weights run in ONNX Runtime and the TorchScript weights load
with torch.jit.load, neither of which executes Python source from the bundle. The
pytorch_state_dict weights need the bundle's architecture file (Python) to be imported, so they
are only run, compared and tested with ``trust_code=True`` (``twinvae validate --trust-code``);
without it those checks are reported as skipped and the torchscript weights are the agreement
reference. ``twinvae export`` trusts the architecture file it has just written.
"""

from __future__ import annotations

import contextlib
import gc
import io
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from twinvae.data.imageset import IMAGE_SIZE, Modality
from twinvae.errors import ExportError
from twinvae.export.formats import FORMATS, PARENT_FORMAT, Runner, get_format
from twinvae.export.formats.base import as_output_list
from twinvae.export.formats.onnx_format import MIN_OPSET_VERSION
from twinvae.export.images import INPUT_GAIN, load_check_images, to_model_space
from twinvae.export.network import ARCHITECTURE_FILE, COUNT_ID, INPUT_ID
from twinvae.export.rdf import CONFIG_FILE, MODALITY_NAMES, RDF_NAME
from twinvae.fileio import sha256_file
from twinvae.runtime import twinvae_bundle as runtime
from twinvae.runtime.twinvae_bundle import FULL_WEIGHTS_FILE

DEFAULT_TOLERANCE = 5e-3
"""Largest accepted difference between weight formats, in counts (and mu units).

Trained full-size networks differ between ONNX Runtime and PyTorch by up to about 1e-3 counts
in float32 (other convolution algorithms and summation orders; measured 8.8e-4 on a 60-epoch PC
model), so 1e-4 rejected sound exports. 5e-3 cells is still far below the rounding that turns a
prediction into a count, and within the tolerance the bundle declares to bioimage.io."""

HTTP_TIMEOUT_S = 3.0
"""bioimageio may look up URLs of foreign bundles; offline, fail fast instead of hanging."""

CODE_FORMATS = frozenset({PARENT_FORMAT})
"""Weight formats whose loading imports Python source from the bundle (the architecture)."""
UNTRUSTED_REFERENCE = "torchscript"
"""The agreement reference when the state-dict weights may not be run."""

SPREAD_MIN_STD = 0.05
"""Counts whose standard deviation over the check images is below this (in cells) are flat."""
SPREAD_MIN_FRACTION = 0.1
"""... and so are counts whose standard deviation is below this fraction of the labels' one."""
SPREAD_IMAGES = 16
"""Generated images the spread is measured on when no check images are given."""
MODALITIES: tuple[Modality, ...] = ("bf", "pc")


@dataclass
class CheckResult:
    """The outcome of one check."""

    name: str
    passed: bool
    detail: str
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    skipped: bool = False
    """The check was not run (it counts as passed); `detail` says why and how to run it."""
    alerts: list[str] = field(default_factory=list)
    """Findings that do not fail the check but make the model unfit for use."""


@dataclass
class ValidationReport:
    """All check results for one bundle."""

    bundle: Path
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def failures(self) -> list[CheckResult]:
        return [check for check in self.checks if not check.passed]

    def skipped(self) -> list[CheckResult]:
        return [check for check in self.checks if check.skipped]

    @property
    def alerts(self) -> list[str]:
        """Every check's alerts (e.g. almost constant predictions), in check order."""
        return [alert for check in self.checks for alert in check.alerts]

    def failure_message(self) -> str:
        """One line per failed check, for error messages."""
        return "; ".join(f"{check.name}: {check.detail}" for check in self.failures())


@dataclass
class _Bundle:
    zip_path: Path
    folder: Path
    rdf: dict[str, Any]


class _CheckError(Exception):
    """A check's own, user-readable failure."""


@contextlib.contextmanager
def quiet_bioimageio() -> Iterator[None]:
    """Short HTTP timeouts and no log output while bioimageio validates or tests."""
    from bioimageio.spec import settings
    from loguru import logger

    timeout = settings.http_timeout
    settings.http_timeout = HTTP_TIMEOUT_S
    # Both libraries switch their own loguru output off when imported; keep it that way (their
    # command line switches it on, and then it would flood twinvae's output).
    logger.disable("bioimageio")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        settings.http_timeout = timeout


# --- package and files -------------------------------------------------------------------------


def _open_package(zip_path: Path, folder: Path) -> _Bundle:
    if zip_path.is_dir():
        raise _CheckError(f"{zip_path}: is a folder; validate the bundle's .zip file")
    if not zip_path.is_file():
        raise _CheckError(f"{zip_path}: file not found")
    try:
        with runtime.open_bundle(zip_path) as files:
            if files.prefix:
                raise _CheckError(
                    f"no {RDF_NAME} at the top level of the zip (it is in {files.prefix!r}); "
                    "zip the bundle's files themselves, not their folder"
                )
            files.extract(folder)
    except runtime.BundleError as error:
        raise _CheckError(str(error)) from None
    try:
        rdf = yaml.safe_load((folder / RDF_NAME).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise _CheckError(f"{RDF_NAME} is not valid YAML: {error}") from None
    if not isinstance(rdf, dict):
        raise _CheckError(f"{RDF_NAME} is not a mapping")
    return _Bundle(zip_path=zip_path, folder=folder, rdf=rdf)


def _file_entries(node: Any, location: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, entry) for every mapping with a local `source` file in the description."""
    if isinstance(node, Mapping):
        source = node.get("source")
        if isinstance(source, str) and "://" not in source:
            yield location, dict(node)
        for key, value in node.items():
            if not location and key == "config":
                continue  # free-form metadata, not files
            yield from _file_entries(value, f"{location}.{key}" if location else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _file_entries(value, f"{location}.{index}")


def _check_files(bundle: _Bundle) -> CheckResult:
    problems: list[str] = []
    notes: list[str] = []
    entries = list(_file_entries(bundle.rdf))
    for location, entry in entries:
        source = entry["source"]
        path = bundle.folder / source
        if not path.is_file():
            problems.append(f"{location}: file {source!r} is missing from the zip")
            continue
        expected = entry.get("sha256")
        if expected is None:
            notes.append(f"{location}: {source} has no sha256")
        elif sha256_file(path) != str(expected):
            problems.append(
                f"{location}: {source} does not match its sha256 in {RDF_NAME} "
                "(the file was changed after packaging)"
            )
    if problems:
        raise _CheckError("; ".join(problems))
    return CheckResult(
        "files", True, f"{len(entries)} files present, sha256 verified", warnings=notes
    )


# --- twinvae contract ----------------------------------------------------------------------------


def _axes(tensor: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    axes = tensor.get("axes") or []
    result = []
    for axis in axes:
        kind = str(axis.get("type"))
        axis_id = str(axis.get("id", kind if kind in ("batch", "channel") else ""))
        size = len(axis.get("channel_names", [])) if kind == "channel" else axis.get("size")
        result.append((kind, axis_id, size))
    return result


def _preprocessing_gain(rdf: Mapping[str, Any]) -> float:
    """The scale_linear gain of the first input (1.0 when absent)."""
    steps = (rdf.get("inputs") or [{}])[0].get("preprocessing") or []
    for step in steps:
        if step.get("id") == "scale_linear":
            return float((step.get("kwargs") or {}).get("gain", 1.0))
    return 1.0


def _check_contract(bundle: _Bundle) -> CheckResult:
    rdf = bundle.rdf
    problems: list[str] = []
    if rdf.get("type") != "model" or not str(rdf.get("format_version", "")).startswith("0.5."):
        problems.append(
            f"expected a bioimage.io model of format 0.5.x, got type {rdf.get('type')!r} "
            f"format {rdf.get('format_version')!r}"
        )
    inputs, outputs = rdf.get("inputs") or [], rdf.get("outputs") or []
    expected_in = [
        ("batch", "batch", None),
        ("channel", "channel", 1),
        ("space", "y", IMAGE_SIZE),
        ("space", "x", IMAGE_SIZE),
    ]
    if not inputs or inputs[0].get("id") != INPUT_ID or _axes(inputs[0]) != expected_in:
        problems.append(
            f"input 0 must be {INPUT_ID!r} with axes batch, channel (1), y ({IMAGE_SIZE}), "
            f"x ({IMAGE_SIZE}); got {inputs[0].get('id') if inputs else None!r} "
            f"{_axes(inputs[0]) if inputs else []}"
        )
    elif abs(_preprocessing_gain(rdf) - INPUT_GAIN) > 1e-12:
        problems.append(
            "input preprocessing must scale 0..255 to [0, 1] (scale_linear gain 1/255), "
            f"got gain {_preprocessing_gain(rdf)}"
        )
    if (
        not outputs
        or outputs[0].get("id") != COUNT_ID
        or _axes(outputs[0]) != [("batch", "batch", None), ("channel", "channel", 1)]
    ):
        problems.append(f"output 0 must be {COUNT_ID!r} with axes batch, channel (1)")
    weights = rdf.get("weights") or {}
    missing = [f.name for f in FORMATS if f.name not in weights]
    if missing:
        problems.append(f"weights missing: {', '.join(missing)}")
    for name, entry in weights.items():
        if (
            name != PARENT_FORMAT
            and isinstance(entry, Mapping)
            and entry.get("parent") != PARENT_FORMAT
        ):
            problems.append(f"weights.{name}.parent must be {PARENT_FORMAT!r}")
    if problems:
        raise _CheckError("; ".join(problems))
    return CheckResult(
        "contract",
        True,
        f"input {INPUT_ID} 1x{IMAGE_SIZE}x{IMAGE_SIZE} (/255), output {COUNT_ID}, "
        f"{len(weights)} weight formats",
    )


# --- bioimageio ----------------------------------------------------------------------------------


def _messages(details: list[Any]) -> tuple[list[str], list[str]]:
    """Error and warning lines of bioimageio validation details."""
    errors: list[str] = []
    notes: list[str] = []
    for detail in details:
        for entry in detail.errors:
            location = ".".join(str(part) for part in entry.loc)
            errors.append(f"{location + ': ' if location else ''}{entry.msg}")
        for entry in detail.warnings:
            location = ".".join(str(part) for part in entry.loc)
            notes.append(f"{location + ': ' if location else ''}{entry.msg}")
    return errors, notes


def _check_format(bundle: _Bundle) -> CheckResult:
    from bioimageio.spec import InvalidDescr, load_description

    with quiet_bioimageio():
        description = load_description(bundle.zip_path, perform_io_checks=True)
    summary = description.validation_summary
    errors, notes = _messages(summary.details)
    if isinstance(description, InvalidDescr) or summary.status == "failed":
        raise _CheckError("; ".join(errors) or "bioimageio.spec rejected the description")
    return CheckResult(
        "bioimageio format", True, f"valid model {summary.format_version}", warnings=notes
    )


@contextlib.contextmanager
def _preserve_global_rng() -> Iterator[None]:
    """bioimageio.core's test seeds torch and numpy globally; give the caller its state back."""
    import torch

    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        torch.use_deterministic_algorithms(deterministic)


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """bioimageio.core runs gc.collect() after every prediction pipeline; in a process that
    holds torch's exporter machinery each full collection takes about a second. Objects that
    exist before the test are moved out of the collector's reach meanwhile (gc.freeze)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _not_trusted(what: str) -> str:
    return (
        f"not run: {what} imports the bundle's Python file {ARCHITECTURE_FILE}; --trust-code "
        "runs it (only for bundles whose code you trust)"
    )


def _core_tests(bundle: _Bundle, trust_code: bool) -> list[CheckResult]:
    """bioimage.io's format validation and model test for the weight formats that may run.

    Returns the format result followed by one result per weight format (skipped for the
    formats that would run code from the bundle, unless ``trust_code``).
    """
    from bioimageio.core import load_description_and_test
    from bioimageio.spec import InvalidDescr, load_description

    weight_formats = list(bundle.rdf.get("weights") or {})
    tested = [w for w in weight_formats if trust_code or w not in CODE_FORMATS]
    start = time.perf_counter()
    with quiet_bioimageio(), _preserve_global_rng(), _gc_frozen(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates torch.jit
        # Loading validates the description and its files; it runs nothing from the bundle.
        description = load_description(bundle.zip_path, perform_io_checks=True)
        for index, weight_format in enumerate(tested):
            if isinstance(description, InvalidDescr):
                break
            description = load_description_and_test(
                description,
                weight_format=weight_format,
                expected_type="model" if index == 0 else None,
            )
    summary = description.validation_summary
    seconds = time.perf_counter() - start
    general = [d for d in summary.details if tuple(d.loc[:1]) != ("weights",)]
    general_errors, general_warnings = _messages(general)
    results = [
        CheckResult(
            "bioimageio format",
            not general_errors,
            "; ".join(general_errors) or f"valid model {summary.format_version}",
            warnings=general_warnings,
        )
    ]
    for weight_format in weight_formats:
        name = f"bioimageio.core test ({weight_format})"
        if weight_format not in tested:
            results.append(CheckResult(name, True, _not_trusted("its model test"), skipped=True))
            continue
        details = [d for d in summary.details if tuple(d.loc[:2]) == ("weights", weight_format)]
        errors, notes = _messages(details)
        if not details:
            errors.append("bioimageio.core ran no test for this format")
        passed = sum(1 for d in details if d.status == "passed")
        results.append(
            CheckResult(
                name,
                not errors,
                "; ".join(errors) or f"{passed} of {len(details)} subtests passed",
                seconds=seconds / max(1, len(tested)),
                warnings=notes,
            )
        )
    if summary.status != "passed" and all(r.passed for r in results):
        errors, _ = _messages(summary.details)
        results.append(
            CheckResult(
                "bioimageio.core test", False, "; ".join(errors) or f"status {summary.status}"
            )
        )
    return results


# --- onnx ----------------------------------------------------------------------------------------


def _check_onnx(bundle: _Bundle) -> CheckResult:
    import onnx

    entry = (bundle.rdf.get("weights") or {}).get("onnx")
    if not isinstance(entry, Mapping):
        raise _CheckError("no onnx weights")
    if entry.get("external_data"):
        raise _CheckError("onnx weights use external data; expected one self-contained file")
    path = bundle.folder / str(entry.get("source"))
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:
        raise _CheckError(f"ONNX checker rejected {path.name}: {error}") from None
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise _CheckError(f"{path.name} keeps {len(external)} initializers in external files")
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < MIN_OPSET_VERSION:
        raise _CheckError(f"opset {opset} < {MIN_OPSET_VERSION}")
    if int(entry.get("opset_version", -1)) != opset:
        raise _CheckError(f"rdf says opset {entry.get('opset_version')}, the file has {opset}")
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        raise _CheckError(
            f"batch axis of {path.name} is fixed at {batch.dim_value}, expected dynamic"
        )
    return CheckResult(
        "onnx", True, f"checker passed, opset {opset}, self-contained, dynamic batch"
    )


# --- agreement -----------------------------------------------------------------------------------


def _bundle_images(bundle: _Bundle) -> tuple[np.ndarray, np.ndarray]:
    """Model-space check images from the bundle: its test input plus flips and rotations,
    and the raw test input itself."""
    inputs = bundle.rdf["inputs"][0]
    raw = np.load(bundle.folder / inputs["test_tensor"]["source"], allow_pickle=False)
    model_space = raw.astype(np.float32) * np.float32(_preprocessing_gain(bundle.rdf))
    first = model_space[:1]
    variants = [first, first[..., ::-1], first[..., ::-1, :], np.rot90(first, 1, axes=(2, 3))]
    return np.ascontiguousarray(np.concatenate([model_space, *variants[1:]])), model_space


def _max_differences(
    reference: list[np.ndarray], other: list[np.ndarray], ids: list[str]
) -> dict[str, float]:
    if len(other) != len(reference):
        raise _CheckError(f"{len(other)} outputs, expected {len(reference)}")
    differences = {}
    for output_id, expected, actual in zip(ids, reference, other, strict=True):
        if expected.shape != actual.shape:
            raise _CheckError(
                f"output {output_id!r} has shape {actual.shape}, expected {expected.shape}"
            )
        differences[output_id] = float(np.max(np.abs(expected.astype(np.float64) - actual)))
    return differences


def _check_agreement(
    bundle: _Bundle,
    images: np.ndarray | None,
    reference: Runner | None,
    tolerance: float,
    trust_code: bool,
) -> CheckResult:
    weights = bundle.rdf.get("weights") or {}
    output_ids = [str(o.get("id")) for o in bundle.rdf.get("outputs") or []]
    runners = {
        name: get_format(name).runner(bundle.folder, entry)
        for name, entry in weights.items()
        if trust_code or name not in CODE_FORMATS
    }
    bundle_images, test_input = _bundle_images(bundle)
    check_images = (
        bundle_images if images is None else np.ascontiguousarray(images, dtype=np.float32)
    )
    own_reference = PARENT_FORMAT if trust_code else UNTRUSTED_REFERENCE
    reference_name = "PyTorch model" if reference is not None else own_reference
    reference_run = reference if reference is not None else runners[own_reference]
    expected = reference_run(check_images)
    problems: list[str] = []
    report: list[str] = []
    largest: dict[str, float] = {}
    for name, run in runners.items():
        if reference is None and name == own_reference:
            continue
        differences = _max_differences(expected, run(check_images), output_ids)
        largest[name] = max(differences.values())
        report.append(f"{name} {largest[name]:.1e}")
        for output_id, difference in differences.items():
            if not difference <= tolerance:
                problems.append(
                    f"{name} differs from the {reference_name} by {difference:.3g} in "
                    f"{output_id!r} (tolerance {tolerance:g})"
                )
    outputs = bundle.rdf.get("outputs") or []
    stored = [
        np.load(bundle.folder / o["test_tensor"]["source"], allow_pickle=False) for o in outputs
    ]
    differences = _max_differences(
        [s.astype(np.float32) for s in stored], reference_run(test_input), output_ids
    )
    for output_id, difference in differences.items():
        if not difference <= tolerance:
            problems.append(
                f"the {reference_name} does not reproduce the stored test output {output_id!r} "
                f"(difference {difference:.3g})"
            )
    if problems:
        raise _CheckError("; ".join(problems))
    return CheckResult(
        "agreement",
        True,
        f"{len(check_images)} images, max |difference| vs {reference_name}: {', '.join(report)}",
    )


# --- full weights --------------------------------------------------------------------------------

FULL_WEIGHTS_CHECK = "full weights"


def _attachments(rdf: Mapping[str, Any]) -> list[str]:
    return [
        str(item.get("source"))
        for item in rdf.get("attachments") or []
        if isinstance(item, Mapping) and item.get("source")
    ]


def _declared_tolerance(rdf: Mapping[str, Any], output_id: str) -> tuple[float, float]:
    """(absolute, relative) reproducibility tolerance rdf.yaml declares for an output."""
    bioimageio = ((rdf.get("config") or {}).get("bioimageio") or {}) if rdf else {}
    for entry in bioimageio.get("reproducibility_tolerance") or []:
        if isinstance(entry, Mapping) and output_id in (entry.get("output_ids") or []):
            return float(entry.get("absolute_tolerance", 0.0)), float(
                entry.get("relative_tolerance", 0.0)
            )
    return DEFAULT_TOLERANCE, 0.0


def _check_full_weights(bundle: _Bundle) -> CheckResult:
    """The attached whole Twin-VAE loads into twinvae's own TwinVAE, and its counting path
    reproduces the bundle's test outputs within the tolerance rdf.yaml declares."""
    import torch

    from twinvae.errors import CheckpointError
    from twinvae.export.full_weights import read_full_weights
    from twinvae.models.twin_vae import TwinVAE

    if FULL_WEIGHTS_FILE not in _attachments(bundle.rdf):
        return CheckResult(
            FULL_WEIGHTS_CHECK,
            True,
            f"not attached ({FULL_WEIGHTS_FILE}): the bundle holds only the counting path, so "
            "fine-tuning from it trains on natural images only (twinvae transfer --natural-only)",
            skipped=True,
        )
    try:
        state, model = read_full_weights(
            (bundle.folder / FULL_WEIGHTS_FILE).read_bytes(), FULL_WEIGHTS_FILE
        )
    except CheckpointError as error:
        raise _CheckError(str(error)) from None
    twin = TwinVAE(model)
    try:
        twin.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise _CheckError(f"{FULL_WEIGHTS_FILE} does not fit its model sizes: {error}") from None
    with_mu = bool(((bundle.rdf.get("config") or {}).get("twinvae") or {}).get("with_mu"))
    network = twin.counting_network("natural", with_mu=with_mu).eval()
    _, test_input = _bundle_images(bundle)
    with torch.no_grad():
        computed = as_output_list(network(torch.from_numpy(test_input)))
    outputs = bundle.rdf.get("outputs") or []
    problems: list[str] = []
    report: list[str] = []
    for output, values in zip(outputs, computed, strict=False):
        output_id = str(output.get("id"))
        stored = np.load(bundle.folder / output["test_tensor"]["source"], allow_pickle=False)
        absolute, relative = _declared_tolerance(bundle.rdf, output_id)
        expected = stored.astype(np.float64).reshape(values.shape)
        difference = np.abs(values.astype(np.float64) - expected)
        allowed = absolute + relative * np.abs(expected)
        report.append(f"{output_id} max |difference| {float(difference.max()):.2g}")
        if not np.all(difference <= allowed):
            problems.append(
                f"the counting path of {FULL_WEIGHTS_FILE} gives {output_id!r} "
                f"{float(difference.max()):.3g} away from the stored test output (declared "
                f"tolerance {absolute:g} + {relative:g} x |value|)"
            )
    if problems:
        raise _CheckError("; ".join(problems))
    return CheckResult(
        FULL_WEIGHTS_CHECK,
        True,
        f"{FULL_WEIGHTS_FILE}: whole Twin-VAE ({len(state)} tensors) loads; its counting path "
        f"reproduces the test output ({', '.join(report)})",
    )


# --- prediction spread ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionSpread:
    """How much a model's counts vary over a set of images, against the labels' variation.

    The counts are flat when their standard deviation is below SPREAD_MIN_STD cells, or below
    SPREAD_MIN_FRACTION of the standard deviation of the labels (labelled images only, when at
    least two are labelled): a model that predicts (almost) the same count for every image.
    """

    std: float
    mean: float
    images: int
    label_std: float | None = None

    @property
    def threshold(self) -> float:
        relative = SPREAD_MIN_FRACTION * self.label_std if self.label_std else 0.0
        return max(SPREAD_MIN_STD, relative)

    @property
    def flat(self) -> bool:
        return self.images >= 2 and self.std < self.threshold

    def describe(self, origin: str) -> str:
        labels = f" (labels' std {self.label_std:.3g})" if self.label_std is not None else ""
        return (
            f"std {self.std:.3g} cells, mean {self.mean:.3g}, over {self.images} {origin}{labels}"
        )


def prediction_spread(
    predictions: np.ndarray, labels: np.ndarray | None = None
) -> PredictionSpread:
    """The spread of predicted counts; labels <= 0 mean unlabelled and are left out."""
    values = np.asarray(predictions, dtype=np.float64).reshape(-1)
    label_std = None
    if labels is not None:
        labelled = np.asarray(labels, dtype=np.float64).reshape(-1)
        labelled = labelled[labelled > 0]
        label_std = float(np.std(labelled)) if len(labelled) >= 2 else None
    return PredictionSpread(
        std=float(np.std(values)),
        mean=float(np.mean(values)),
        images=len(values),
        label_std=label_std,
    )


def _bundle_modality(bundle: _Bundle) -> Modality | None:
    """'bf' or 'pc' from the bundle's config.yaml (twinvae bundles; for other modalities the
    generator settings the run used), else from its tags."""
    config_path = bundle.folder / CONFIG_FILE
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            config = None
        data = config.get("data") if isinstance(config, dict) else None
        declared = data.get("modality") if isinstance(data, dict) else None
        generator = data.get("synthetic_generator") if isinstance(data, dict) else None
        if isinstance(generator, dict) and generator.get("modality") in MODALITIES:
            declared = generator["modality"]  # other modalities: the generator settings used
        for modality in MODALITIES:
            if declared == modality:
                return modality
    tags = bundle.rdf.get("tags") or []
    found = [modality for modality in MODALITIES if MODALITY_NAMES[modality] in tags]
    return found[0] if len(found) == 1 else None


def _check_spread(
    bundle: _Bundle, images: np.ndarray | None, labels: np.ndarray | None
) -> CheckResult:
    """Counts of the ONNX weights (what `twinvae predict` runs) over the check images."""
    if images is not None:
        origin = "check images"
        model_images = np.ascontiguousarray(images, dtype=np.float32)
    else:
        modality = _bundle_modality(bundle)
        if modality is None:
            return CheckResult(
                "prediction spread",
                True,
                "not run: no check images (--data) and the bundle names no modality to "
                "generate images for",
                skipped=True,
            )
        generated = load_check_images(None, modality, SPREAD_IMAGES)
        origin = f"generated natural-style {modality.upper()} images"
        model_images, labels = to_model_space(generated.images), generated.counts
    weights = bundle.rdf.get("weights") or {}
    run = get_format("onnx").runner(bundle.folder, weights["onnx"])
    spread = prediction_spread(run(model_images)[0], labels)
    detail = spread.describe(origin)
    if not spread.flat:
        return CheckResult("prediction spread", True, detail)
    alert = (
        f"the model predicts (almost) the same count for every image: {detail}, below "
        f"{spread.threshold:.3g} (the larger of {SPREAD_MIN_STD:g} cells and "
        f"{SPREAD_MIN_FRACTION:g} x the labels' std). It has not learned to count (e.g. its "
        "best epoch predicted the mean count); check its training before using it"
    )
    return CheckResult("prediction spread", True, f"FLAT: {detail}", alerts=[alert])


# --- driver --------------------------------------------------------------------------------------


def _run(name: str, check: Callable[[], CheckResult], report: ValidationReport) -> bool:
    start = time.perf_counter()
    try:
        result = check()
    except _CheckError as failure:
        result = CheckResult(name, False, str(failure))
    except Exception as error:  # a crash inside a check is a failed check, not a traceback
        result = CheckResult(name, False, f"{type(error).__name__}: {error}")
    result.seconds = time.perf_counter() - start
    report.checks.append(result)
    return result.passed


def validate_bundle(
    bundle_path: Path | str,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    reference: Runner | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    core_tests: bool = True,
    trust_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ValidationReport:
    """Run every check on a bundle zip.

    images: model-space images (N, 1, 128, 128) in [0, 1] to compare the formats on and to
    measure the prediction spread on (default: the bundle's test input and three flips/rotations
    of it for the comparison, generated images of the bundle's modality for the spread).
    labels: the counts of ``images`` (<= 0 = unlabelled), for the spread check.
    reference: the PyTorch model to compare with (default: the bundle's pytorch_state_dict, or
    its torchscript weights without ``trust_code``).
    trust_code: run the state-dict weights, whose architecture is Python code from the bundle.
    """
    zip_path = Path(bundle_path)
    report = ValidationReport(bundle=zip_path)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="twinvae-validate-") as scratch:
        opened: list[_Bundle] = []

        def package() -> CheckResult:
            opened.append(_open_package(zip_path, Path(scratch)))
            return CheckResult(
                "package", True, f"{RDF_NAME} found, {zip_path.stat().st_size / 1e6:.1f} MB"
            )

        def step(name: str, check: Callable[[], CheckResult]) -> bool:
            if progress is not None:
                progress(name)
            return _run(name, check, report)

        if step("package", package):
            bundle = opened[0]
            files_ok = step("files", lambda: _check_files(bundle))
            contract_ok = step("contract", lambda: _check_contract(bundle))
            if not (core_tests and files_ok):
                step("bioimageio format", lambda: _check_format(bundle))
            if files_ok and contract_ok:
                step("onnx", lambda: _check_onnx(bundle))
                step(
                    "agreement",
                    lambda: _check_agreement(bundle, images, reference, tolerance, trust_code),
                )
                step(FULL_WEIGHTS_CHECK, lambda: _check_full_weights(bundle))
                if not trust_code:
                    report.checks.append(
                        CheckResult(
                            f"{PARENT_FORMAT} weights",
                            True,
                            _not_trusted("building the network"),
                            skipped=True,
                        )
                    )
                step("prediction spread", lambda: _check_spread(bundle, images, labels))
            if core_tests and files_ok:
                if progress is not None:
                    progress("bioimageio.core test")
                try:
                    report.checks.extend(_core_tests(bundle, trust_code))
                except Exception as error:
                    report.checks.append(
                        CheckResult(
                            "bioimageio.core test", False, f"{type(error).__name__}: {error}"
                        )
                    )
    report.seconds = time.perf_counter() - start
    return report


def require_valid(report: ValidationReport) -> None:
    """Raise ExportError naming every failed check."""
    if not report.passed:
        raise ExportError(f"{report.bundle.name} failed validation: {report.failure_message()}")
