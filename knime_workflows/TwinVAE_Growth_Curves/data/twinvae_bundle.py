"""Open twinvae bioimage.io model bundles safely and run their ONNX weights on grey images.

This module is self-contained: it imports no twinvae code, only numpy, onnxruntime, pyyaml,
pillow and tifffile, so it can be copied next to a KNIME workflow (``data/twinvae_bundle.py``) and
run in KNIME's Python environment. Every twinvae command that reads a bundle (``predict``,
``evaluate``, ``validate``, ``transfer``, ``knime build``) opens it with ``open_bundle`` here.

A bundle is a bioimage.io model (format 0.5; 0.4 spellings of axes and preprocessing are
understood too) as a ``.zip`` with ``rdf.yaml`` at its top level (or in its only folder), or an
unpacked folder holding ``rdf.yaml``. ``open_bundle`` checks every member before anything is
read: names must be plain relative paths (no absolute paths, "..", backslashes or drive letters),
no links or special files, no name twice (also not in another case), and the sizes stay within
``BundleLimits``. Only the ONNX weights are run: nothing in a bundle is executed as Python. The
first input gets the grey images as ``(batch, channel=1, y, x)`` after the preprocessing listed
in ``rdf.yaml``; the first output holds one count per image.

Images: PNG, JPEG, TIFF, BMP. RGB(A) is converted to grey (ITU-R 601-2 luma, like Pillow's
``convert("L")``); 16-bit images are scaled to 8 bits over the full 16-bit range (value / 257);
float images in 0..1 are scaled by 255, other floats are clipped to 0..255. Images whose size
differs from the model input (128 x 128 for twinvae) are resized with bilinear interpolation
(``resize=False`` rejects them instead).

Example::

    from twinvae_bundle import BundlePredictor
    predictor = BundlePredictor("model.zip")
    for file, count in predictor.predict_files(["a.png", "b.png"]):
        print(file, count)
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import posixpath
import re
import stat
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "DEFAULT_LIMITS",
    "FULL_WEIGHTS_FILE",
    "IMAGE_SUFFIXES",
    "RDF_NAME",
    "BundleError",
    "BundleFiles",
    "BundleInfo",
    "BundleLimits",
    "BundlePredictor",
    "MissingPackageError",
    "apply_processing",
    "has_full_weights",
    "install_hint",
    "list_images",
    "open_bundle",
    "png_bytes",
    "read_bundle_info",
    "read_grey_image",
    "require",
    "to_model_input",
    "unsafe_name_reason",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
RDF_NAME = "rdf.yaml"
FULL_WEIGHTS_FILE = "twinvae_weights.safetensors"
"""The attachment holding the whole Twin-VAE (both encoders, both decoders, shared layers,
regressor) that fine-tuning starts from; bundles exported before it existed lack it."""

_PIP_NAMES = {"yaml": "pyyaml", "PIL": "pillow", "onnxruntime": "onnxruntime"}
_CONDA_NAMES = {"yaml": "pyyaml", "PIL": "pillow"}


class MissingPackageError(ImportError):
    """A Python package needed here is not installed in the running Python environment."""


class BundleError(ValueError):
    """A bundle or an image cannot be used: the message names the file and what was expected."""


def install_hint(module: str) -> str:
    """How to install the package that provides ``module``."""
    pip_name = _PIP_NAMES.get(module, module)
    conda_name = _CONDA_NAMES.get(module, module)
    return (
        f"The Python package '{pip_name}' is missing in this Python environment. Install it with "
        f"'pip install {pip_name}' or 'conda install -c conda-forge {conda_name}' into the "
        "environment that runs this code (in KNIME: the environment chosen under Preferences > "
        "KNIME > Python)."
    )


def require(module: str) -> ModuleType:
    """Import a module or raise MissingPackageError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingPackageError(install_hint(module.split(".")[0])) from error


np: Any = require("numpy")


# -- bundle description ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleInfo:
    """What this module needs from a bundle's rdf.yaml."""

    source: str
    name: str
    format_version: str
    input_id: str
    input_axes: tuple[str, ...]
    input_size: tuple[int, int]
    input_channels: int
    input_dtype: str
    preprocessing: tuple[dict[str, Any], ...]
    output_ids: tuple[str, ...]
    postprocessing: tuple[dict[str, Any], ...]
    onnx_file: str
    onnx_sha256: str | None
    description: str = ""
    rdf: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# -- opening a bundle -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleLimits:
    """Bounds on a bundle's contents, so that a hostile zip cannot fill the disk or memory.

    Sizes are the uncompressed sizes; zipfile never reads more than a member declares.
    """

    max_files: int = 1000
    max_file_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30


DEFAULT_LIMITS = BundleLimits()

_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")


def unsafe_name_reason(name: str) -> str | None:
    """Why a member name could write or read outside the bundle, or None for a plain name.

    A plain name is a relative POSIX path of non-empty parts other than "." and "..";
    a trailing "/" marks a folder entry.
    """
    if not name:
        return "empty name"
    if "\\" in name:
        return "backslash in the name (a Windows path separator)"
    if "\x00" in name:
        return "NUL character in the name"
    if name.startswith("/"):
        return "absolute path"
    if _DRIVE_LETTER.match(name):
        return "drive letter"
    parts = name.removesuffix("/").split("/")
    if ".." in parts:
        return "'..' leads out of the bundle"
    if any(part in ("", ".") for part in parts):
        return "empty or '.' path component"
    return None


def _member_kind(info: zipfile.ZipInfo) -> str | None:
    """'symbolic link' or 'special file' for members that are not plain files or folders."""
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type in (0, stat.S_IFREG, stat.S_IFDIR):
        return None
    return "symbolic link" if file_type == stat.S_IFLNK else "special file (device, pipe)"


class BundleFiles:
    """The files of a bundle (a .zip or a folder), checked when opened.

    Opening refuses member names that could reach outside the bundle (absolute paths, "..",
    backslashes, drive letters), links and special files, names that occur twice (also when
    they differ only in case) and contents beyond ``limits``; the error names the bundle and
    the member. Use as a context manager, or call ``close``.
    """

    def __init__(self, path: str | Path, limits: BundleLimits = DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.limits = limits
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, zipfile.ZipInfo] = {}
        self._sizes: dict[str, int] = {}
        self._folded: dict[str, str] = {}
        self._total = 0
        self.prefix = ""
        """The folder inside a zip that holds rdf.yaml ("" when it is at the top level)."""
        if not self.path.exists():
            raise BundleError(f"model bundle {self.path} does not exist")
        if self.path.is_dir():
            self._scan_folder()
        else:
            self._scan_zip()
        self._find_rdf()

    def _refuse(self, member: str, why: str) -> BundleError:
        return BundleError(
            f"model bundle {self.path}: refusing member {member!r}: {why}; the bundle cannot be "
            "used safely (re-create it with 'twinvae export', or re-zip its files under plain "
            "relative names)"
        )

    def _add(self, name: str, size: int) -> None:
        limits = self.limits
        if size > limits.max_file_bytes:
            raise self._refuse(
                name, f"{size} bytes, more than the {limits.max_file_bytes} bytes allowed per file"
            )
        if len(self._sizes) >= limits.max_files:
            raise self._refuse(name, f"more than {limits.max_files} files in the bundle")
        clash = self._folded.get(name.casefold())
        if clash is not None:
            same = "twice" if clash == name else f"twice (as {clash!r}, names differing in case)"
            raise self._refuse(name, f"the name occurs {same}")
        self._folded[name.casefold()] = name
        self._sizes[name] = size
        self._total += size
        if self._total > limits.max_total_bytes:
            raise self._refuse(
                name, f"the files add up to more than the {limits.max_total_bytes} bytes allowed"
            )

    def _scan_zip(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as error:
            raise BundleError(f"model bundle {self.path} is not a zip archive ({error})") from None
        try:
            for info in self._zip.infolist():
                reason = unsafe_name_reason(info.filename) or _member_kind(info)
                if reason is None and info.flag_bits & 0x1:
                    reason = "encrypted member"
                if reason is not None:
                    raise self._refuse(info.filename, reason)
                if info.is_dir():
                    continue
                self._add(info.filename, info.file_size)
                self._members[info.filename] = info
        except BundleError:
            self.close()
            raise

    def _scan_folder(self) -> None:
        for root, folders, files in os.walk(self.path):
            base = Path(root)
            for name in sorted(folders) + sorted(files):
                entry = base / name
                relative = entry.relative_to(self.path).as_posix()
                reason = unsafe_name_reason(relative)
                if reason is None and entry.is_symlink():
                    reason = "symbolic link"
                if reason is None and name in files and not entry.is_file():
                    reason = "special file (device, pipe)"
                if reason is not None:
                    raise self._refuse(relative, reason)
                if name in files:
                    self._add(relative, entry.stat().st_size)

    def _find_rdf(self) -> None:
        if RDF_NAME in self._sizes:
            return
        nested = [name for name in self._sizes if posixpath.basename(name) == RDF_NAME]
        if self._zip is None or len(nested) != 1:
            self.close()
            where = "folder" if self._zip is None else "zip"
            raise BundleError(
                f"model bundle {self.path}: no {RDF_NAME} at the top level of the {where}"
            )
        self.prefix = posixpath.dirname(nested[0]) + "/"

    @property
    def names(self) -> list[str]:
        """The bundle's files, relative to the folder that holds rdf.yaml."""
        return [
            name.removeprefix(self.prefix) for name in self._sizes if name.startswith(self.prefix)
        ]

    def _member(self, relative: str) -> str:
        clean = relative.strip()
        while clean.startswith("./"):
            clean = clean[2:]
        if "://" in clean:
            raise BundleError(
                f"model bundle {self.path}: {relative!r} is a URL; only files inside the bundle "
                "are read"
            )
        reason = unsafe_name_reason(clean)
        if reason is not None:
            raise self._refuse(relative, reason)
        name = self.prefix + clean
        if name not in self._sizes:
            raise BundleError(f"model bundle {self.path} has no file {clean!r}")
        return name

    def read(self, relative: str) -> bytes:
        """A file named relative to rdf.yaml (as rdf.yaml names its files)."""
        name = self._member(relative)
        if self._zip is None:
            path = self.path / name
            if path.is_symlink():  # replaced since the bundle was opened
                raise self._refuse(name, "symbolic link")
            return path.read_bytes()
        try:
            return self._zip.read(self._members[name])  # checks the member's CRC
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise BundleError(
                f"model bundle {self.path}: member {name!r} is corrupt ({error})"
            ) from None

    def extract(self, folder: str | Path) -> None:
        """Copy every file into ``folder`` (names relative to rdf.yaml); CRCs are checked."""
        target_root = Path(folder)
        for relative in self.names:
            target = target_root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read(relative))

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> BundleFiles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_bundle(bundle: str | Path, limits: BundleLimits = DEFAULT_LIMITS) -> BundleFiles:
    """Open a bundle (.zip or folder) after checking every member; see BundleFiles."""
    return BundleFiles(bundle, limits)


def read_bundle_info(bundle: str | Path | BundleFiles) -> BundleInfo:
    """Parse the parts of rdf.yaml this module uses (no onnxruntime needed)."""
    if isinstance(bundle, BundleFiles):
        return _read_info(bundle)
    with open_bundle(bundle) as files:
        return _read_info(files)


def _read_info(files: BundleFiles) -> BundleInfo:
    yaml = require("yaml")
    try:
        rdf = yaml.safe_load(files.read(RDF_NAME))
    except yaml.YAMLError as error:
        raise BundleError(
            f"model bundle {files.path}: {RDF_NAME} is not valid YAML: {error}"
        ) from error
    if not isinstance(rdf, dict):
        raise BundleError(f"model bundle {files.path}: {RDF_NAME} must be a mapping")
    return _parse_rdf(rdf, str(files.path))


def has_full_weights(info: BundleInfo) -> bool:
    """Whether the bundle attaches the whole Twin-VAE (``FULL_WEIGHTS_FILE``), not only the
    counting path its weight formats hold."""
    attachments = info.rdf.get("attachments")
    if not isinstance(attachments, list):
        return False
    return any(
        isinstance(item, dict) and str(item.get("source", "")) == FULL_WEIGHTS_FILE
        for item in attachments
    )


def _parse_rdf(rdf: dict[str, Any], source: str) -> BundleInfo:
    where = f"model bundle {source}: rdf.yaml"
    inputs = rdf.get("inputs")
    outputs = rdf.get("outputs")
    if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], dict):
        raise BundleError(f"{where} needs a non-empty 'inputs' list")
    if not isinstance(outputs, list) or not outputs:
        raise BundleError(f"{where} needs a non-empty 'outputs' list")
    tensor = inputs[0]
    input_id = str(tensor.get("id", tensor.get("name", "input0")))
    axes, sizes, channels = _parse_axes(tensor, where)
    if "y" not in axes or "x" not in axes:
        raise BundleError(f"{where}: input {input_id!r} needs the space axes y and x, got {axes}")
    height, width = sizes.get("y"), sizes.get("x")
    if height is None or width is None:
        raise BundleError(f"{where}: input {input_id!r} needs fixed y and x sizes")
    weights = rdf.get("weights")
    onnx = weights.get("onnx") if isinstance(weights, dict) else None
    if not isinstance(onnx, dict) or not onnx.get("source"):
        raise BundleError(f"{where} has no 'weights: onnx: source' entry")
    output_ids = tuple(
        str(out.get("id", out.get("name", f"output{i}"))) if isinstance(out, dict) else str(i)
        for i, out in enumerate(outputs)
    )
    first_output = outputs[0] if isinstance(outputs[0], dict) else {}
    return BundleInfo(
        source=source,
        name=str(rdf.get("name", Path(source).stem)),
        format_version=str(rdf.get("format_version", "")),
        input_id=input_id,
        input_axes=tuple(axes),
        input_size=(height, width),
        input_channels=channels,
        input_dtype=_input_dtype(tensor),
        preprocessing=tuple(_processing_list(tensor.get("preprocessing"), where)),
        output_ids=output_ids,
        postprocessing=tuple(_processing_list(first_output.get("postprocessing"), where)),
        onnx_file=str(onnx["source"]),
        onnx_sha256=str(onnx["sha256"]) if onnx.get("sha256") else None,
        description=str(rdf.get("description", "")),
        rdf=rdf,
    )


def _parse_axes(tensor: dict[str, Any], where: str) -> tuple[list[str], dict[str, int], int]:
    raw = tensor.get("axes")
    axes: list[str] = []
    sizes: dict[str, int] = {}
    channels = 1
    if isinstance(raw, str):  # format 0.4: "bcyx" plus a shape list
        axes = list(raw)
        shape = tensor.get("shape")
        if isinstance(shape, list) and len(shape) == len(axes):
            sizes = {axis: int(size) for axis, size in zip(axes, shape, strict=True)}
            channels = sizes.get("c", 1)
        elif isinstance(shape, dict) and isinstance(shape.get("min"), list):
            sizes = {axis: int(size) for axis, size in zip(axes, shape["min"], strict=True)}
        axes = ["batch" if a == "b" else "channel" if a == "c" else a for a in axes]
        return axes, sizes, channels
    if not isinstance(raw, list):
        raise BundleError(f"{where}: input axes must be a list (format 0.5) or a string (0.4)")
    for axis in raw:
        if not isinstance(axis, dict):
            raise BundleError(f"{where}: each input axis must be a mapping, got {axis!r}")
        kind = str(axis.get("type", ""))
        if kind in {"batch", "channel"}:
            axes.append(kind)
            if kind == "channel":
                names = axis.get("channel_names")
                channels = len(names) if isinstance(names, list) else 1
        else:
            axis_id = str(axis.get("id", kind))
            axes.append(axis_id)
            size = axis.get("size")
            if isinstance(size, int):
                sizes[axis_id] = size
            elif isinstance(size, dict) and isinstance(size.get("min"), int):
                sizes[axis_id] = int(size["min"])
    return axes, sizes, channels


def _input_dtype(tensor: dict[str, Any]) -> str:
    data = tensor.get("data")
    if isinstance(data, dict) and data.get("type"):
        return str(data["type"])
    return str(tensor.get("data_type", "float32"))


def _processing_list(raw: Any, where: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BundleError(f"{where}: preprocessing/postprocessing must be a list")
    steps = []
    for step in raw:
        if not isinstance(step, dict) or not (step.get("id") or step.get("name")):
            raise BundleError(f"{where}: each processing step needs an 'id', got {step!r}")
        kwargs = step.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise BundleError(f"{where}: kwargs of {step!r} must be a mapping")
        steps.append({"id": str(step.get("id") or step.get("name")), "kwargs": dict(kwargs)})
    return steps


# -- preprocessing --------------------------------------------------------------------------------

_Step = Callable[[Any, dict[str, Any], tuple[str, ...]], Any]


def _scalar(kwargs: dict[str, Any], key: str, default: float | None, op: str) -> float:
    value = kwargs.get(key, default)
    if isinstance(value, list):
        if len(value) != 1:
            raise BundleError(f"processing '{op}': per-axis values for {key!r} are not supported")
        value = value[0]
    if value is None:
        raise BundleError(f"processing '{op}' needs the argument {key!r}")
    return float(value)


def _reduce_axes(kwargs: dict[str, Any], axes: tuple[str, ...], op: str) -> tuple[int, ...]:
    """Axes to reduce for per-image statistics (never the batch axis)."""
    names = kwargs.get("axes")
    if names is None:
        return tuple(i for i, axis in enumerate(axes) if axis != "batch")
    if isinstance(names, str):  # format 0.4 spelling, e.g. "xy"
        names = list(names)
    mapping = {"b": "batch", "c": "channel"}
    wanted = [mapping.get(str(name), str(name)) for name in names]
    if "batch" in wanted:
        raise BundleError(f"processing '{op}': statistics over the batch axis are not supported")
    missing = [name for name in wanted if name not in axes]
    if missing:
        raise BundleError(f"processing '{op}': unknown axes {missing}; the input has {axes}")
    return tuple(axes.index(name) for name in wanted)


def _ensure_dtype(data: Any, kwargs: dict[str, Any], axes: tuple[str, ...]) -> Any:
    dtype = kwargs.get("dtype")
    if not dtype:
        raise BundleError("processing 'ensure_dtype' needs the argument 'dtype'")
    return data.astype(str(dtype))


def _scale_linear(data: Any, kwargs: dict[str, Any], axes: tuple[str, ...]) -> Any:
    gain = _scalar(kwargs, "gain", 1.0, "scale_linear")
    offset = _scalar(kwargs, "offset", 0.0, "scale_linear")
    return data * gain + offset


def _scale_range(data: Any, kwargs: dict[str, Any], axes: tuple[str, ...]) -> Any:
    if kwargs.get("reference_tensor") or kwargs.get("mode") == "per_dataset":
        raise BundleError("processing 'scale_range': only per-image statistics are supported")
    reduce = _reduce_axes(kwargs, axes, "scale_range")
    low = np.percentile(
        data, _scalar(kwargs, "min_percentile", 0.0, "scale_range"), reduce, keepdims=True
    )
    high = np.percentile(
        data, _scalar(kwargs, "max_percentile", 100.0, "scale_range"), reduce, keepdims=True
    )
    eps = _scalar(kwargs, "eps", 1e-6, "scale_range")
    return (data - low) / (high - low + eps)


def _zero_mean_unit_variance(data: Any, kwargs: dict[str, Any], axes: tuple[str, ...]) -> Any:
    eps = _scalar(kwargs, "eps", 1e-6, "zero_mean_unit_variance")
    if kwargs.get("mode") == "fixed":  # format 0.4 spelling of fixed_zero_mean_unit_variance
        return _fixed_zero_mean_unit_variance(data, kwargs, axes)
    if kwargs.get("mode") == "per_dataset":
        raise BundleError("processing 'zero_mean_unit_variance': per_dataset is not supported")
    reduce = _reduce_axes(kwargs, axes, "zero_mean_unit_variance")
    mean = data.mean(axis=reduce, keepdims=True)
    std = data.std(axis=reduce, keepdims=True)
    return (data - mean) / (std + eps)


def _fixed_zero_mean_unit_variance(data: Any, kwargs: dict[str, Any], axes: tuple[str, ...]) -> Any:
    mean = _scalar(kwargs, "mean", None, "fixed_zero_mean_unit_variance")
    std = _scalar(kwargs, "std", None, "fixed_zero_mean_unit_variance")
    eps = _scalar(kwargs, "eps", 1e-6, "fixed_zero_mean_unit_variance")
    return (data - mean) / (std + eps)


def _clip(data: Any, kwargs: dict[str, Any], axes: tuple[str, ...]) -> Any:
    low = kwargs.get("min")
    high = kwargs.get("max")
    if low is None and high is None:
        raise BundleError("processing 'clip' needs 'min' or 'max'")
    return np.clip(data, low, high)


_STEPS: dict[str, _Step] = {
    "ensure_dtype": _ensure_dtype,
    "scale_linear": _scale_linear,
    "scale_range": _scale_range,
    "zero_mean_unit_variance": _zero_mean_unit_variance,
    "fixed_zero_mean_unit_variance": _fixed_zero_mean_unit_variance,
    "clip": _clip,
}


def apply_processing(data: Any, steps: Iterable[dict[str, Any]], axes: Sequence[str]) -> Any:
    """Apply bioimage.io processing steps (spec 0.5 ids, simple non-per-axis forms) in order."""
    result = np.asarray(data)
    for step in steps:
        operation = _STEPS.get(step["id"])
        if operation is None:
            raise BundleError(
                f"processing step {step['id']!r} is not supported here; supported: "
                f"{', '.join(sorted(_STEPS))}"
            )
        result = operation(result, step.get("kwargs", {}), tuple(axes))
    return result


# -- images ---------------------------------------------------------------------------------------


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files in a folder, sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise BundleError(f"image folder {root} does not exist or is not a folder")
    pattern = "**/*" if recursive else "*"
    found = [
        path
        for path in root.glob(pattern)
        if path.is_file()
        and path.suffix.lower() in IMAGE_SUFFIXES
        and not path.name.startswith(".")
    ]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _to_uint8(array: Any, source: str) -> Any:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.min() >= 0 and array.max() <= 255:
            return array.astype(np.uint8)
        if array.min() >= 0 and array.max() <= 65535:
            return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
        raise BundleError(
            f"image {source}: {array.dtype} values outside 0..65535 are not supported"
        )
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise BundleError(f"image {source} holds NaN or infinite values")
        scaled = array * 255.0 if array.min() >= 0 and array.max() <= 1 else array
        return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    raise BundleError(f"image {source}: pixel type {array.dtype} is not supported")


def _rgb_to_grey(array: Any) -> Any:
    rgb = array[..., :3].astype(np.float64)
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return grey


def _as_grey(array: Any, source: str) -> Any:
    data = np.asarray(array)
    data = np.squeeze(data)
    if data.ndim == 3 and data.shape[-1] not in (3, 4) and data.shape[0] in (3, 4):
        data = np.moveaxis(data, 0, -1)  # channel-first TIFF
    if data.ndim == 3 and data.shape[-1] in (3, 4):
        if np.issubdtype(data.dtype, np.integer) and data.dtype.itemsize == 1:
            return np.floor(_rgb_to_grey(data) + 0.5).astype(np.uint8)
        data = _rgb_to_grey(_to_uint8(data, source).astype(np.float64))
        return np.floor(data + 0.5).astype(np.uint8)
    if data.ndim != 2:
        raise BundleError(
            f"image {source} has shape {data.shape}; expected a 2-D grey or RGB image"
        )
    return _to_uint8(data, source)


_ARRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def read_grey_image(path: str | Path) -> Any:
    """Read an image file as a 2-D uint8 grey array (RGB/16-bit/float converted, see module doc)."""
    source = Path(path)
    if not source.is_file():
        raise BundleError(f"image {source} does not exist")
    if source.suffix.lower() in (".tif", ".tiff"):
        tifffile = require("tifffile")
        try:
            data = tifffile.imread(source)
        except Exception as error:
            raise BundleError(f"image {source} cannot be read as TIFF: {error}") from error
        return _as_grey(data, str(source))
    image_module = require("PIL.Image")
    try:
        with image_module.open(source) as image:
            image.load()
            if image.mode in _ARRAY_MODES:  # 16/32-bit integer or float pixels
                return _as_grey(np.asarray(image), str(source))
            if image.mode != "L":
                image = image.convert("L")
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, ValueError) as error:
        raise BundleError(f"image {source} cannot be read: {error}") from error


def to_model_input(image: Any, size: tuple[int, int], resize: bool = True, source: str = "") -> Any:
    """Bring a grey uint8 image to the model's (height, width), resizing when allowed."""
    grey = np.asarray(image)
    if grey.dtype != np.uint8 or grey.ndim != 2:
        grey = _as_grey(grey, source or "array")
    if grey.shape == tuple(size):
        return grey
    if not resize:
        raise BundleError(
            f"image {source or 'array'} is {grey.shape[1]}x{grey.shape[0]} pixels; the model "
            f"needs {size[1]}x{size[0]}; to rescale it, pass --resize (twinvae predict; "
            "Python: resize=True)"
        )
    image_module = require("PIL.Image")
    resized = image_module.fromarray(grey).resize((size[1], size[0]), image_module.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


# -- prediction -----------------------------------------------------------------------------------


def _default_providers(onnxruntime: Any) -> list[str]:
    available = set(onnxruntime.get_available_providers())
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    return providers


class BundlePredictor:
    """Count cells with the ONNX weights of a bundle.

    ``providers`` defaults to CUDA when onnxruntime offers it, else CPU. ``batch_size`` is the
    number of images per onnxruntime call (a model with a fixed batch size uses that size).
    """

    def __init__(
        self,
        bundle_path: str | Path,
        providers: Sequence[str] | None = None,
        batch_size: int = 64,
        resize: bool = True,
    ) -> None:
        if batch_size < 1:
            raise BundleError(f"batch_size must be at least 1, got {batch_size}")
        with open_bundle(bundle_path) as files:
            self.info = read_bundle_info(files)
            weights = files.read(self.info.onnx_file)
        onnxruntime = require("onnxruntime")
        if self.info.onnx_sha256:
            digest = hashlib.sha256(weights).hexdigest()
            if digest != self.info.onnx_sha256.lower():
                raise BundleError(
                    f"model bundle {bundle_path}: {self.info.onnx_file} has sha256 {digest}, "
                    f"rdf.yaml says {self.info.onnx_sha256}"
                )
        chosen = list(providers) if providers is not None else _default_providers(onnxruntime)
        try:
            self.session = onnxruntime.InferenceSession(weights, providers=chosen)
        except Exception as error:
            raise BundleError(
                f"model bundle {bundle_path}: onnxruntime cannot load "
                f"{self.info.onnx_file}: {error}"
            ) from error
        self.providers: list[str] = list(self.session.get_providers())
        session_input = self.session.get_inputs()[0]
        self._input_name: str = session_input.name
        fixed_batch = session_input.shape[0] if session_input.shape else None
        self.batch_size = (
            fixed_batch if isinstance(fixed_batch, int) and fixed_batch > 0 else batch_size
        )
        self._output_names: list[str] = [out.name for out in self.session.get_outputs()]
        self._count_output = (
            self.info.output_ids[0]
            if self.info.output_ids[0] in self._output_names
            else self._output_names[0]
        )
        self.resize = resize

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.info.input_size

    def read_images(self, paths: Sequence[str | Path]) -> Any:
        """Read files as a (N, H, W) uint8 stack at the model's input size."""
        height, width = self.input_size
        stack = np.empty((len(paths), height, width), dtype=np.uint8)
        for index, path in enumerate(paths):
            stack[index] = to_model_input(
                read_grey_image(path), (height, width), self.resize, str(path)
            )
        return stack

    def _model_input(self, images: Any) -> Any:
        batch = images[:, None, :, :]
        if self.info.input_channels != 1:
            batch = np.repeat(batch, self.info.input_channels, axis=1)
        axes: tuple[str, ...] = ("batch", "channel", "y", "x")
        if "channel" not in self.info.input_axes:
            batch, axes = batch[:, 0], ("batch", "y", "x")
        unknown = sorted(set(self.info.input_axes) - set(axes))
        if unknown or len(self.info.input_axes) != len(axes):
            raise BundleError(
                f"model bundle {self.info.source}: input axes {self.info.input_axes} are not "
                "supported; expected batch, channel, y, x"
            )
        processed = apply_processing(batch, self.info.preprocessing, axes)
        order = [axes.index(axis) for axis in self.info.input_axes]
        return np.ascontiguousarray(np.transpose(processed, order)).astype(self.info.input_dtype)

    def predict_arrays(self, images: Any) -> Any:
        """Counts (float32, shape (N,)) for a (N, H, W) uint8 stack (or a single (H, W) image)."""
        stack = np.asarray(images)
        if stack.ndim == 2:
            stack = stack[None]
        if stack.ndim != 3:
            raise BundleError(f"images must be (N, H, W), got shape {stack.shape}")
        if stack.dtype != np.uint8:
            raise BundleError(f"images must be uint8 grey values 0..255, got {stack.dtype}")
        if stack.shape[1:] != self.input_size:
            stack = np.stack(
                [to_model_input(image, self.input_size, self.resize) for image in stack]
            )
        counts = np.empty(len(stack), dtype=np.float32)
        for start in range(0, len(stack), self.batch_size):
            chunk = stack[start : start + self.batch_size]
            feed = self._model_input(chunk)
            pad = 0
            if len(chunk) < self.batch_size and self._fixed_batch():
                pad = self.batch_size - len(chunk)
                feed = np.concatenate([feed, np.repeat(feed[-1:], pad, axis=0)])
            (output,) = self.session.run([self._count_output], {self._input_name: feed})
            output = apply_processing(output, self.info.postprocessing, ("batch", "channel"))
            values = np.asarray(output, dtype=np.float32).reshape(len(feed), -1)[:, 0]
            counts[start : start + len(chunk)] = values[: len(chunk)]
        return counts

    def _fixed_batch(self) -> bool:
        shape = self.session.get_inputs()[0].shape
        return bool(shape) and isinstance(shape[0], int)

    def predict_files(
        self,
        paths: Sequence[str | Path],
        progress: Callable[[int, int], None] | None = None,
    ) -> list[tuple[str, float]]:
        """(file, count) for each image file, in the given order; ``progress(done, total)``."""
        results: list[tuple[str, float]] = []
        total = len(paths)
        for start in range(0, total, self.batch_size):
            chunk = list(paths[start : start + self.batch_size])
            counts = self.predict_arrays(self.read_images(chunk))
            results.extend(
                (str(path), float(count)) for path, count in zip(chunk, counts, strict=True)
            )
            if progress is not None:
                progress(len(results), total)
        return results


def png_bytes(image: Any) -> bytes:
    """Encode a 2-D uint8 array as PNG bytes."""
    image_module = require("PIL.Image")
    buffer = io.BytesIO()
    image_module.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
