"""Shared fixtures: the real CHO-K1 data (skipped when absent) and small generated image folders."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

ImageWriter = Callable[[Path, np.ndarray], Path]
FolderMaker = Callable[..., Path]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Tests use tiny models: one thread is as fast and does not spin against other jobs."""
    import torch

    torch.set_num_threads(1)


def _cho_k1_location() -> Path:
    configured = os.environ.get("TWINVAE_CHO_K1")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "shared/data/cho-k1"


# The development checkout keeps the data beside the project (../shared/data/cho-k1): tests that
# run twinvae on builtin configs find it there without set-up, as users do via TWINVAE_CHO_K1.
if not os.environ.get("TWINVAE_CHO_K1") and _cho_k1_location().is_dir():
    os.environ["TWINVAE_CHO_K1"] = str(_cho_k1_location())


@pytest.fixture
def cho_k1_root() -> Path:
    """The real CHO-K1 data folder (holding bf/ and pc/); skips the test when it is absent."""
    root = _cho_k1_location()
    if not (root / "pc" / "train.csv").is_file() or not (root / "bf" / "train.csv").is_file():
        pytest.skip(f"real CHO-K1 data not found at {root} (set TWINVAE_CHO_K1 to its folder)")
    return root


def random_image(seed: int, size: int = 128, dtype: type = np.uint8) -> np.ndarray:
    """A reproducible noise image (grey) of the given integer dtype."""
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(
        0, top, size=(size, size), endpoint=True, dtype=dtype
    )


def save_image(path: Path, pixels: np.ndarray) -> Path:
    """Write pixels as PNG, JPEG (quality 95) or TIFF, chosen by the file suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, pixels)
    elif suffix in (".jpg", ".jpeg"):
        Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    else:
        Image.fromarray(pixels).save(path, format="PNG")
    return path


@pytest.fixture
def write_image() -> ImageWriter:
    """save_image as a fixture: write_image(path, pixels) -> path."""
    return save_image


def _write_counts(csv_path: Path, rows: Sequence[tuple[str, int]], header: str | None) -> None:
    lines = ([header] if header else []) + [f"{name},{count}" for name, count in rows]
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def make_image_folder(tmp_path: Path) -> FolderMaker:
    """make_image_folder(names, counts=None, folder="images", size=128) -> folder.

    Writes one noise image per name (format from its suffix) and, when counts is given,
    counts.csv with the header "filename,count".
    """

    def make(
        names: Sequence[str],
        counts: Mapping[str, int] | None = None,
        folder: str = "images",
        size: int = 128,
    ) -> Path:
        target = tmp_path / folder
        target.mkdir(parents=True, exist_ok=True)
        for index, name in enumerate(names):
            save_image(target / name, random_image(index, size))
        if counts is not None:
            _write_counts(target / "counts.csv", list(counts.items()), "filename,count")
        return target

    return make


@pytest.fixture
def make_cho_k1_tree(tmp_path: Path) -> FolderMaker:
    """make_cho_k1_tree(rows, modality="pc", split="train") -> CHO-K1 root folder.

    rows: (relative/path, count) pairs; writes the images (noise, format from the suffix)
    under <root>/<modality>/ and the header-less <split>.csv listing them.
    """

    def make(rows: Sequence[tuple[str, int]], modality: str = "pc", split: str = "train") -> Path:
        root = tmp_path / "cho-k1"
        folder = root / modality
        for index, (name, _) in enumerate(rows):
            save_image(folder / name, random_image(1000 + index))
        folder.mkdir(parents=True, exist_ok=True)
        _write_counts(folder / f"{split}.csv", rows, None)
        return root

    return make


def chamber_rows(
    chambers: int, frames: int, labelled_every: int = 3, prefix: str = "train/nd063_crop"
) -> list[tuple[str, int]]:
    """CHO-K1 style rows: chambers x frames PNGs, every labelled_every-th frame labelled."""
    return [
        (f"{prefix}xy{c:02d}t{f:03d}c1.png", (f % 7) + 1 if f % labelled_every == 0 else 0)
        for c in range(1, chambers + 1)
        for f in range(1, frames + 1)
    ]


@pytest.fixture
def make_chamber_rows() -> Callable[..., list[tuple[str, int]]]:
    """chamber_rows as a fixture."""
    return chamber_rows
