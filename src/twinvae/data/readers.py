"""Readers for real image data: the CHO-K1 layout, generic image folders, and single images.

Every image is decoded once into an in-memory `ImageSet` of (N, H, W) uint8 grey images.
Problems (missing, unreadable or truncated files, wrong sizes, bad CSV rows) raise `DataError`
naming the file and CSV line, or with skip_bad=True are skipped, listed in `ImageSet.skipped`
and reported in one `SkippedInputWarning`: nothing is dropped silently.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile
from PIL import Image, ImageFile

from twinvae.data.cache import DecodedImages, cache_key, load_cached, store_cached
from twinvae.data.imageset import IMAGE_SIZE, MAX_COUNT, Domain, ImageSet, Modality
from twinvae.data.splits import count_chambers
from twinvae.errors import ConfigError, DataError, SkippedInputWarning
from twinvae.progress import bar

Split = Literal["train", "test"]
MODALITIES: tuple[Modality, ...] = ("bf", "pc")
SPLITS: tuple[Split, ...] = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
COUNTS_CSV = "counts.csv"

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_LUMINANCE = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as Pillow's convert("L")


class _ImageError(Exception):
    """Why one image cannot be used (the caller adds the file name)."""


# --- single images ---------------------------------------------------------------------------


class _StrictTruncation:
    """Keeps Pillow's LOAD_TRUNCATED_IMAGES off while we decode, so truncated files fail.

    The flag is a Pillow module global that other code may have switched on; concurrent
    decoders share one switch-off and the previous value returns when the last one ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    ImageFile.LOAD_TRUNCATED_IMAGES = self._saved


_strict_truncation = _StrictTruncation()


def read_grey_image(path: Path | str, size: int = IMAGE_SIZE, resize: bool = False) -> np.ndarray:
    """Decode a PNG, JPEG or TIFF (8 or 16 bit; grey, RGB or RGBA) into a (size, size) uint8 array.

    16-bit values are scaled linearly (0..65535 -> 0..255, rounded); colour becomes luminance.
    A different size raises DataError unless resize=True (antialiased Lanczos resampling).
    """
    path = Path(path)
    with _strict_truncation():
        try:
            return _decode_grey(path, size, resize)
        except _ImageError as problem:
            raise DataError(f"{path}: {problem}") from None


def _decode_grey(path: Path, size: int, resize: bool) -> np.ndarray:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _ImageError("file not found") from None
    except OSError as error:
        raise _ImageError(f"cannot read the file ({error.strerror or error})") from None
    if not data:
        raise _ImageError("file is empty")
    pixels = _decode_tiff(data) if data[:4] in _TIFF_MAGIC else _decode_with_pillow(data)
    grey = _to_grey_uint8(pixels)
    if grey.shape != (size, size):
        if not resize:
            height, width = grey.shape
            raise _ImageError(
                f"image is {width}x{height} pixels, expected {size}x{size}; to rescale it, pass "
                "--resize (training: --set data.resize=true; Python: resize=True)"
            )
        resized = Image.fromarray(grey).resize((size, size), Image.Resampling.LANCZOS)
        grey = np.asarray(resized, dtype=np.uint8)
    return grey


def _decode_with_pillow(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            pixels = _pillow_pixels(image)
    except Image.UnidentifiedImageError:
        raise _ImageError("not a readable PNG, JPEG or TIFF image") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        kind = "truncated image" if "truncated" in str(error).lower() else "corrupt image"
        raise _ImageError(f"{kind} ({error})") from None
    # Pillow stops reading once the pixel data is complete; a PNG cut after that lacks IEND.
    if data.startswith(_PNG_MAGIC) and data.rfind(b"IEND") < 0:
        raise _ImageError("truncated image (PNG has no IEND chunk)")
    return pixels


def _pillow_pixels(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("L", "RGB", "RGBA", "LA"):
        return np.asarray(image)
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":  # some 16-bit PNGs open as 32-bit integers
        pixels = np.asarray(image)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise _ImageError("32-bit integer pixels are not supported (expected 8 or 16 bit)")
        return pixels.astype(np.uint16)
    if mode == "F":
        raise _ImageError("floating-point pixels are not supported (expected 8 or 16 bit)")
    return np.asarray(image.convert("RGB"))  # palette, 1-bit, CMYK, YCbCr, ...


def _decode_tiff(data: bytes) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            if len(tiff.pages) != 1:
                raise _ImageError(f"TIFF has {len(tiff.pages)} pages, expected a single 2D image")
            page = tiff.pages.first
            pixels = np.asarray(page.asarray())
            planar = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    except _ImageError:
        raise
    except Exception as error:  # tifffile raises many types on corrupt input
        raise _ImageError(f"corrupt or truncated TIFF ({error})") from None
    if planar and pixels.ndim == 3:
        pixels = np.moveaxis(pixels, 0, -1)
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    return pixels


def _to_grey_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype not in (np.uint8, np.uint16):
        raise _ImageError(f"pixel type {pixels.dtype} is not supported (expected 8 or 16 bit)")
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 2):  # grey, grey + alpha
        pixels = pixels[..., 0]
    if pixels.ndim == 2 and pixels.dtype == np.uint8:
        return np.array(pixels)  # owned and writable (Pillow arrays may be read-only)
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):  # RGB, RGBA: alpha is ignored
        grey = pixels[..., :3] @ _LUMINANCE
    elif pixels.ndim == 2:
        grey = pixels.astype(np.float64)
    else:
        raise _ImageError(f"array of shape {pixels.shape} is not a grey, RGB or RGBA image")
    if pixels.dtype == np.uint16:
        grey = grey * (255.0 / 65535.0)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


# --- many images, with optional on-disk cache -------------------------------------------------


def _try_decode(path: Path, size: int, resize: bool) -> np.ndarray | str:
    try:
        return _decode_grey(path, size, resize)
    except _ImageError as problem:
        return str(problem)


def decode_images(
    paths: Sequence[Path],
    *,
    size: int = IMAGE_SIZE,
    resize: bool = False,
    cache_dir: Path | None = None,
    progress: bool = False,
    stop_on_error: bool = False,
    description: str = "Decoding images",
) -> DecodedImages:
    """Decode many images in parallel threads; reasons[i] says why image i failed ("" if fine).

    With cache_dir, a complete decode is stored as .npz and reused while no file changed.
    stop_on_error ends at the first failure in input order (that result is not cached).
    """
    key = None
    if cache_dir is not None:
        key = cache_key(paths, {"size": size, "resize": resize})
        cached = load_cached(cache_dir, key, paths)
        if cached is not None:
            return cached
    images = np.zeros((len(paths), size, size), dtype=np.uint8)
    reasons = [""] * len(paths)
    complete = True
    workers = min(4, os.cpu_count() or 1)
    with (
        _strict_truncation(),
        ThreadPoolExecutor(max_workers=workers) as pool,
        bar(description, len(paths), progress) as task,
    ):
        results = pool.map(_try_decode, paths, repeat(size), repeat(resize))
        for index, result in enumerate(results):
            if isinstance(result, str):
                reasons[index] = result
                if stop_on_error:
                    complete = False
                    pool.shutdown(wait=False, cancel_futures=True)
                    break
            else:
                images[index] = result
            task.advance()
    decoded = DecodedImages(images=images, reasons=reasons)
    if cache_dir is not None and key is not None and complete:
        store_cached(cache_dir, key, paths, decoded)
    return decoded


# --- CSV rows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    name: str
    count: int
    line: int
    time_point: tuple[str, int] | None = None


@dataclass(frozen=True)
class _Entry:
    """One image to read: its name in the set, file, count and where it was listed."""

    name: str
    path: Path
    count: int
    origin: str | None


def _csv_lines(csv_path: Path) -> list[tuple[int, list[str]]]:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{csv_path}: file not found") from None
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not a UTF-8 text file") from None
    except OSError as error:
        raise DataError(f"{csv_path}: cannot read the file ({error.strerror or error})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [
        (number, [field.strip() for field in next(csv.reader([line]))])
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]


def _parse_count_rows(
    csv_path: Path,
    row_format: str,
    max_count: int,
    skip_bad: bool,
    skipped: list[str],
    time_columns: bool = False,
) -> list[_Row]:
    """Rows "name,count" (an optional first line "...,count" is a header); bad rows raise/skip.

    With ``time_columns``, a header "...,count,chamber,frame" announces rows that also give
    each image's chamber and frame (time point).
    """
    rows: list[_Row] = []
    first_line: dict[str, int] = {}
    timed = False
    for position, (line, fields) in enumerate(_csv_lines(csv_path)):
        header = [field.lower() for field in fields]
        if position == 0 and len(fields) == 2 and header[1] == "count":
            continue
        if position == 0 and time_columns and header[1:] == ["count", "chamber", "frame"]:
            timed, row_format = True, f"{row_format},chamber,frame"
            continue
        point, problem = None, None
        if timed:
            point, problem = _time_columns(fields)
            fields = fields[:2]
        problem = problem or _row_problem(fields, max_count, first_line)
        if problem is not None:
            message = f"{csv_path}, line {line}: {problem}"
            if not skip_bad:
                raise DataError(f"{message}; expected rows '{row_format}'")
            skipped.append(message)
            continue
        first_line[fields[0]] = line
        rows.append(_Row(name=fields[0], count=int(fields[1]), line=line, time_point=point))
    return rows


def _time_columns(fields: list[str]) -> tuple[tuple[str, int] | None, str | None]:
    """(chamber, frame) of a row "name,count,chamber,frame", or why it is malformed."""
    if len(fields) != 4:
        return None, f"malformed row with {len(fields)} field(s) {','.join(fields)!r}"
    chamber, frame = fields[2], fields[3]
    if not chamber:
        return None, "malformed row: empty chamber"
    if not frame.isdigit():
        return None, f"malformed row: frame {frame!r} is not a whole number >= 0"
    return (chamber, int(frame)), None


def _row_problem(fields: list[str], max_count: int, first_line: dict[str, int]) -> str | None:
    if len(fields) != 2:
        return f"malformed row with {len(fields)} field(s) {','.join(fields)!r}"
    name, count_text = fields
    if not name:
        return "malformed row with an empty file name"
    try:
        count = int(count_text)
    except ValueError:
        return f"malformed row: count {count_text!r} is not an integer"
    if count < 0:
        return f"negative count {count} for {name}; counts are 0 (not labelled) to {max_count}"
    if count > max_count:
        return f"count {count} for {name} is above the maximum {max_count}"
    if name in first_line:
        return f"{name} is listed again (first on line {first_line[name]})"
    return None


def _warn_skipped(source: str, skipped: list[str]) -> None:
    """One SkippedInputWarning listing everything, attributed to the caller outside this package."""
    level, frame = 1, sys._getframe(0)
    package = os.path.dirname(__file__)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    message = f"{source}: skipped {len(skipped)} bad input(s):\n  " + "\n  ".join(skipped)
    warnings.warn(SkippedInputWarning(message), stacklevel=level)


def _build_set(
    entries: list[_Entry],
    *,
    source: str,
    modality: Modality | None,
    domain: Domain,
    skip_bad: bool,
    skipped: list[str],
    size: int,
    resize: bool,
    cache_dir: Path | None,
    progress: bool,
) -> ImageSet:
    decoded = decode_images(
        [entry.path for entry in entries],
        size=size,
        resize=resize,
        cache_dir=cache_dir,
        progress=progress,
        stop_on_error=not skip_bad,
        description=f"Reading {Path(source).parent.name}/{Path(source).name}",
    )
    keep: list[int] = []
    for index, (entry, reason) in enumerate(zip(entries, decoded.reasons, strict=True)):
        if not reason:
            keep.append(index)
            continue
        listed = f" (listed in {entry.origin})" if entry.origin else ""
        message = f"{entry.path}: {reason}{listed}"
        if not skip_bad:
            raise DataError(message)
        skipped.append(message)
    if skipped:
        _warn_skipped(source, skipped)
    if not keep:
        raise DataError(f"{source}: no usable images (all {len(skipped)} inputs were skipped)")
    images = decoded.images if len(keep) == len(entries) else decoded.images[keep]
    return ImageSet(
        images=images,
        counts=np.array([entries[i].count for i in keep], dtype=np.int16),
        names=[entries[i].name for i in keep],
        domain=domain,
        modality=modality,
        source=source,
        skipped=list(skipped),
    )


# --- CHO-K1 layout ---------------------------------------------------------------------------


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def modality_folder(root: Path, modality: Modality, split: Split) -> Path:
    """The folder holding <split>.csv: root/<modality>/, or root itself if it is that folder."""
    root = Path(root)
    if (root / modality / f"{split}.csv").is_file():
        return root / modality
    if (root / f"{split}.csv").is_file():
        if root.name.lower() in MODALITIES and root.name.lower() != modality:
            raise DataError(
                f"{root} is the {root.name} folder, but modality {modality} was requested"
            )
        return root
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    raise DataError(
        f"{root}: found neither {modality}/{split}.csv nor {split}.csv; expected the CHO-K1 "
        "layout <root>/{bf,pc}/{train,test}.csv or a modality folder holding train.csv/test.csv"
    )


def list_count_csv(csv_path: Path | str, max_count: int = MAX_COUNT) -> list[tuple[str, int]]:
    """The (relative path, count) rows of a CHO-K1 style CSV, checked, without reading images."""
    rows = _parse_count_rows(Path(csv_path), "relative/path,count", max_count, False, [])
    return [(row.name, row.count) for row in rows]


def read_count_csv(
    csv_path: Path | str,
    *,
    modality: Modality | None = None,
    domain: Domain = "natural",
    skip_bad: bool = False,
    resize: bool = False,
    max_count: int = MAX_COUNT,
    cache_dir: Path | None = None,
    progress: bool = False,
    size: int = IMAGE_SIZE,
) -> ImageSet:
    """Read a CHO-K1 style CSV: rows "relative/path,count" relative to the CSV's folder."""
    csv_path = Path(csv_path)
    skipped: list[str] = []
    rows = _parse_count_rows(csv_path, "relative/path,count", max_count, skip_bad, skipped)
    if not rows and not skipped:
        raise DataError(f"{csv_path}: no rows; expected lines 'relative/path,count'")
    base = csv_path.parent
    entries = [
        _Entry(row.name, base / row.name, row.count, f"{csv_path}, line {row.line}") for row in rows
    ]
    return _build_set(
        entries,
        source=str(csv_path),
        modality=modality,
        domain=domain,
        skip_bad=skip_bad,
        skipped=skipped,
        size=size,
        resize=resize,
        cache_dir=cache_dir,
        progress=progress,
    )


def read_cho_k1(
    root: Path | str,
    modality: Modality,
    split: Split,
    *,
    skip_bad: bool = False,
    resize: bool = False,
    max_count: int = MAX_COUNT,
    cache_dir: Path | None = None,
    progress: bool = False,
    size: int = IMAGE_SIZE,
) -> ImageSet:
    """Read <root>/<modality>/<split>.csv (root may also be the modality folder itself)."""
    _check_choice("modality", modality, MODALITIES)
    _check_choice("split", split, SPLITS)
    folder = modality_folder(Path(root), modality, split)
    return read_count_csv(
        folder / f"{split}.csv",
        modality=modality,
        skip_bad=skip_bad,
        resize=resize,
        max_count=max_count,
        cache_dir=cache_dir,
        progress=progress,
        size=size,
    )


# --- generic layout --------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Image files directly in folder (not in subfolders), sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.name,
    )


def read_image_folder(
    folder: Path | str,
    *,
    skip_bad: bool = False,
    resize: bool = False,
    max_count: int = MAX_COUNT,
    cache_dir: Path | None = None,
    progress: bool = False,
    size: int = IMAGE_SIZE,
    modality: Modality | None = None,
    domain: Domain = "natural",
) -> ImageSet:
    """Read every image of a folder plus optional counts.csv ("filename,count", header allowed).

    Images missing from counts.csv are unlabelled (count 0). A header
    "filename,count,chamber,frame" adds each listed image's chamber and frame (time point).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    images = list_images(folder)
    if not images:
        raise DataError(
            f"{folder}: no images found; expected {', '.join(IMAGE_SUFFIXES)} files "
            f"(and optionally {COUNTS_CSV})"
        )
    skipped: list[str] = []
    counts: dict[str, tuple[int, str]] = {}
    time_points: dict[str, tuple[str, int]] = {}
    counts_csv = folder / COUNTS_CSV
    if counts_csv.exists():
        names = {path.name for path in images}
        rows = _parse_count_rows(
            counts_csv, "filename,count", max_count, skip_bad, skipped, time_columns=True
        )
        for row in rows:
            if row.name not in names:
                what = "no such file" if not (folder / row.name).exists() else "not an image"
                message = (
                    f"{counts_csv}, line {row.line}: names {row.name!r} ({what}); expected the "
                    f"name of a {'/'.join(IMAGE_SUFFIXES)} file in {folder}"
                )
                if not skip_bad:
                    raise DataError(message)
                skipped.append(message)
                continue
            counts[row.name] = (row.count, f"{counts_csv}, line {row.line}")
            if row.time_point is not None:
                time_points[row.name] = row.time_point
    entries = [_Entry(path.name, path, *counts.get(path.name, (0, None))) for path in images]
    image_set = _build_set(
        entries,
        source=str(folder),
        modality=modality,
        domain=domain,
        skip_bad=skip_bad,
        skipped=skipped,
        size=size,
        resize=resize,
        cache_dir=cache_dir,
        progress=progress,
    )
    if time_points:
        image_set.time_points = [time_points.get(name) for name in image_set.names]
    return image_set


# --- dispatch --------------------------------------------------------------------------------

_NO_LAYOUT = (
    "expected a CHO-K1 CSV file (rows 'relative/path,count'), a modality folder holding "
    "train.csv/test.csv, a CHO-K1 root holding bf/ and pc/, or a folder of images "
    f"({', '.join(IMAGE_SUFFIXES)}) with optional {COUNTS_CSV}"
)


def _modality_from_name(folder: Path) -> Modality | None:
    name = folder.name.lower()
    return "bf" if name == "bf" else "pc" if name == "pc" else None


def _resolve_modality(folder: Path, modality: Modality | None) -> Modality | None:
    named = _modality_from_name(folder)
    if modality is not None:
        _check_choice("modality", modality, MODALITIES)
        if named is not None and named != modality:
            raise DataError(f"{folder} is the {named} folder, but modality {modality} was given")
    return modality or named


def _is_modality_folder(folder: Path) -> bool:
    return any((folder / f"{split}.csv").is_file() for split in SPLITS)


def _root_modalities(folder: Path) -> list[Modality]:
    return [m for m in MODALITIES if (folder / m).is_dir() and _is_modality_folder(folder / m)]


def detect_layout(path: Path) -> Literal["csv", "modality", "root", "folder"]:
    """Which layout a path is: CHO-K1 CSV, modality folder, CHO-K1 root or generic folder."""
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path}: a file that is not a CSV; {_NO_LAYOUT}")
        return "folder" if path.name == COUNTS_CSV else "csv"
    if _is_modality_folder(path):
        return "modality"
    if _root_modalities(path):
        return "root"
    if (path / COUNTS_CSV).is_file() or list_images(path):
        return "folder"
    raise DataError(f"{path}: matches no known layout; {_NO_LAYOUT}")


def load_image_set(
    path: Path | str,
    *,
    split: Split | None = None,
    modality: Modality | None = None,
    skip_bad: bool = False,
    resize: bool = False,
    max_count: int = MAX_COUNT,
    cache_dir: Path | None = None,
    progress: bool = False,
    size: int = IMAGE_SIZE,
    domain: Domain = "natural",
) -> ImageSet:
    """Read whatever layout path is: a CHO-K1 CSV file, a modality folder (needs split), a
    CHO-K1 root (needs modality and split), or a generic image folder."""
    path = Path(path)
    options: dict[str, Any] = {
        "skip_bad": skip_bad,
        "resize": resize,
        "max_count": max_count,
        "cache_dir": cache_dir,
        "progress": progress,
        "size": size,
    }
    layout = detect_layout(path)
    if layout == "folder":
        folder = path.parent if path.is_file() else path
        return read_image_folder(folder, modality=modality, domain=domain, **options)
    if layout == "csv":
        chosen = _resolve_modality(path.parent, modality)
        return read_count_csv(path, modality=chosen, domain=domain, **options)
    if split is None:
        raise ConfigError(f"{path} holds train.csv and test.csv: choose a split (train or test)")
    _check_choice("split", split, SPLITS)
    if layout == "modality":
        chosen = _resolve_modality(path, modality)
        return read_count_csv(path / f"{split}.csv", modality=chosen, domain=domain, **options)
    if modality is None:
        raise ConfigError(f"{path} is a CHO-K1 root: choose a modality (bf or pc)")
    return read_cho_k1(path, modality, split, **options)


@dataclass
class NamedSet:
    """An image set with a display label ("pc/train") and its split when known."""

    label: str
    split: Split | None
    image_set: ImageSet


def load_splits(
    path: Path | str,
    *,
    split: Split | Literal["all"] = "all",
    modality: Modality | Literal["all"] = "all",
    skip_bad: bool = False,
    resize: bool = False,
    max_count: int = MAX_COUNT,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> list[NamedSet]:
    """Every set a path holds, for inspection: all splits (and modalities of a CHO-K1 root)."""
    path = Path(path)
    options: dict[str, Any] = {
        "skip_bad": skip_bad,
        "resize": resize,
        "max_count": max_count,
        "cache_dir": cache_dir,
        "progress": progress,
    }
    if split != "all":
        _check_choice("split", split, SPLITS)
    if modality != "all":
        _check_choice("modality", modality, MODALITIES)
    layout = detect_layout(path)
    if layout in ("csv", "folder"):
        given = None if modality == "all" else modality
        image_set = load_image_set(path, modality=given, **options)
        csv_split: Split | None = None
        if layout == "csv":
            csv_split = "train" if path.stem == "train" else "test" if path.stem == "test" else None
        folder = path.parent if path.is_file() else path
        label = f"{folder.name}/{path.name}" if layout == "csv" else folder.name
        return [NamedSet(label, csv_split, image_set)]
    folders = [path] if layout == "modality" else [path / m for m in _root_modalities(path)]
    if modality != "all":
        folders = [f for f in folders if _modality_from_name(f) in (None, modality)]
        if not folders:
            raise DataError(f"{path}: holds no {modality} data")
    found: list[NamedSet] = []
    for folder in folders:
        chosen = _resolve_modality(folder, None if modality == "all" else modality)
        for name in SPLITS if split == "all" else (split,):
            csv_path = folder / f"{name}.csv"
            if split == "all" and not csv_path.is_file():
                continue
            image_set = read_count_csv(csv_path, modality=chosen, **options)
            found.append(NamedSet(f"{folder.name}/{name}", name, image_set))
    return found


def summarize(image_set: ImageSet) -> dict[str, Any]:
    """Table 1-style numbers: sizes, labelled/unlabelled, count range and histogram, grey mean."""
    counts = image_set.counts
    labelled = counts[counts > 0]
    values, frequencies = np.unique(labelled, return_counts=True)
    return {
        "source": image_set.source,
        "domain": image_set.domain,
        "modality": image_set.modality,
        "images": len(image_set),
        "labelled": int(labelled.size),
        "unlabelled": int(len(image_set) - labelled.size),
        "count_min": int(labelled.min()) if labelled.size else None,
        "count_max": int(labelled.max()) if labelled.size else None,
        "chambers": count_chambers(image_set.names),
        "mean_grey": float(image_set.images.mean() / 255.0) if len(image_set) else None,
        "histogram": {int(v): int(f) for v, f in zip(values, frequencies, strict=True)},
        "skipped": len(image_set.skipped),
    }
