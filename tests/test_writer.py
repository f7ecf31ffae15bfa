"""Tests of writing an image set as PNGs + counts.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from twinvae.data.imageset import ImageSet
from twinvae.data.readers import read_image_folder
from twinvae.data.writer import (
    ImageFolderWriter,
    output_file_name,
    png_bytes,
    write_image_folder,
)
from twinvae.errors import DataError


@pytest.fixture
def small_set() -> ImageSet:
    """Four noise images with counts, one of them unlabelled."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 128, 128), dtype=np.uint8)
    return ImageSet(
        images=images,
        counts=np.array([3, 0, 30, 1]),
        names=["syn_000000.png", "syn_000001.png", "syn_000002.png", "syn_000003.png"],
        domain="synthetic",
    )


def test_round_trip_gives_the_same_pixels_and_counts(small_set: ImageSet, tmp_path: Path) -> None:
    folder = write_image_folder(small_set, tmp_path / "out")
    assert folder == tmp_path / "out"
    for name, image in zip(small_set.names, small_set.images, strict=True):
        with Image.open(folder / name) as png:
            assert png.format == "PNG" and png.mode == "L"
            assert np.array_equal(np.asarray(png), image)
    lines = (folder / "counts.csv").read_text(encoding="utf-8").splitlines()
    assert lines == ["filename,count"] + [
        f"{name},{count}" for name, count in zip(small_set.names, small_set.counts, strict=True)
    ]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left
    read_back = read_image_folder(folder)
    order = [read_back.names.index(name) for name in small_set.names]
    assert np.array_equal(read_back.images[order], small_set.images)
    assert np.array_equal(read_back.counts[order], small_set.counts)


def test_bytes_are_deterministic(small_set: ImageSet, tmp_path: Path) -> None:
    first = write_image_folder(small_set, tmp_path / "a")
    second = write_image_folder(small_set, tmp_path / "b", progress=True)
    for path in sorted(first.iterdir()):
        assert path.read_bytes() == (second / path.name).read_bytes()
    assert png_bytes(small_set.images[0]) == png_bytes(small_set.images[0].copy())


def test_refuses_a_non_empty_folder_unless_overwrite(small_set: ImageSet, tmp_path: Path) -> None:
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty") as error:
        write_image_folder(small_set, folder)
    assert str(folder) in str(error.value)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    write_image_folder(small_set, folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert len(list(folder.glob("*.png"))) == 4
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        write_image_folder(small_set, tmp_path / "file", overwrite=True)


def test_names_become_flat_png_file_names(tmp_path: Path) -> None:
    assert output_file_name("train/nd063xy01t001c1.jpg") == "train_nd063xy01t001c1.png"
    assert output_file_name("a.PNG") == "a.PNG"
    assert output_file_name("plain") == "plain.png"
    for bad in ("../x.png", ".hidden.png", "", "a,b.png"):
        with pytest.raises(DataError):
            output_file_name(bad)
    writer = ImageFolderWriter(tmp_path / "dups", workers=2)
    images = np.zeros((2, 8, 8), np.uint8)
    with pytest.raises(DataError, match="unique"):
        writer.add(["x/a.png", "x_a.png"], images, np.array([1, 2]))
