"""Tests of image decoding, the CHO-K1 and generic readers, the loader dispatch and the cache."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from conftest import FolderMaker, ImageWriter, random_image
from twinvae.data import readers
from twinvae.data.readers import (
    SkippedInputWarning,
    load_image_set,
    read_cho_k1,
    read_grey_image,
    read_image_folder,
)
from twinvae.errors import ConfigError, DataError

# --- single images ---------------------------------------------------------------------------


def test_png_grey_is_read_exactly(tmp_path: Path, write_image: ImageWriter) -> None:
    pixels = random_image(1)
    image = read_grey_image(write_image(tmp_path / "a.png", pixels))
    assert image.dtype == np.uint8
    assert image.shape == (128, 128)
    np.testing.assert_array_equal(image, pixels)


def test_jpeg_grey_is_close_to_the_original(tmp_path: Path, write_image: ImageWriter) -> None:
    pixels = np.tile(np.arange(128, dtype=np.uint8) * 2, (128, 1))  # smooth: JPEG keeps it well
    image = read_grey_image(write_image(tmp_path / "a.JPG", pixels))
    assert image.shape == (128, 128)
    assert np.abs(image.astype(int) - pixels).max() <= 4


def test_16_bit_tiff_and_png_are_scaled_linearly(tmp_path: Path, write_image: ImageWriter) -> None:
    pixels = random_image(2, dtype=np.uint16)
    pixels[0, :4] = [0, 65535, 128, 32767]
    expected = np.rint(pixels / 257.0).astype(np.uint8)
    for name in ("a.tif", "b.png"):
        image = read_grey_image(write_image(tmp_path / name, pixels))
        np.testing.assert_array_equal(image, expected, err_msg=name)
    assert list(expected[0, :4]) == [0, 255, 0, 127]


def test_rgb_and_rgba_become_luminance(tmp_path: Path, write_image: ImageWriter) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    pillow_grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=int)
    rgba = np.concatenate([rgb, np.full((128, 128, 1), 7, np.uint8)], axis=-1)
    for name, pixels in (("rgb.png", rgb), ("rgba.png", rgba), ("rgb.tif", rgb)):
        image = read_grey_image(write_image(tmp_path / name, pixels))
        assert image.shape == (128, 128)
        assert np.abs(image.astype(int) - pillow_grey).max() <= 1, name


def test_16_bit_rgb_tiff(tmp_path: Path, write_image: ImageWriter) -> None:
    rgb = np.zeros((128, 128, 3), np.uint16)
    rgb[..., 1] = 65535  # pure green: luminance 0.587
    image = read_grey_image(write_image(tmp_path / "g.tiff", rgb))
    assert np.all(image == round(0.587 * 255))


def test_wrong_size_names_file_and_both_sizes(tmp_path: Path, write_image: ImageWriter) -> None:
    path = write_image(tmp_path / "small.png", np.zeros((90, 100), np.uint8))
    with pytest.raises(DataError) as error:
        read_grey_image(path)
    message = str(error.value)
    assert str(path) in message and "100x90" in message and "128x128" in message
    # the hint names options that exist: the commands' --resize and the config key
    assert "--resize" in message and "data.resize=true" in message
    assert "resize option" not in message


def test_resize_option_rescales_with_antialiasing(tmp_path: Path, write_image: ImageWriter) -> None:
    stripes = np.zeros((256, 256), np.uint8)
    stripes[:, ::2] = 200  # one-pixel stripes: antialiasing averages them to ~100
    image = read_grey_image(write_image(tmp_path / "big.png", stripes), resize=True)
    assert image.shape == (128, 128)
    assert 90 <= image[10:-10, 10:-10].mean() <= 110
    assert image[10:-10, 10:-10].std() < 10


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(DataError, match=r"nope\.png: file not found"):
        read_grey_image(missing)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"garbage\.png: not a readable"):
        read_grey_image(garbage)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jpg: file is empty"):
        read_grey_image(empty)
    with pytest.raises(DataError, match="cannot read"):
        read_grey_image(tmp_path)


def _encoded(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, "end"])
def test_truncated_files_are_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_format: str, keep: float | str
) -> None:
    data = _encoded(random_image(4), image_format)
    cut = len(data) - 12 if keep == "end" else int(len(data) * float(keep))  # "end": no IEND/EOI
    path = tmp_path / f"cut.{image_format.lower()}"
    path.write_bytes(data[:cut])
    # Even if other code told Pillow to accept truncated files, we must not.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match=r"cut\.\w+: truncated"):
        read_grey_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_truncated_tiff_is_detected(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, random_image(5))
    path = tmp_path / "cut.tif"
    path.write_bytes(buffer.getvalue()[:100])
    with pytest.raises(DataError, match=r"cut\.tif"):
        read_grey_image(path)


def test_multi_page_tiff_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 128, 128), np.uint8), photometric="minisblack")
    with pytest.raises(DataError, match="3 pages"):
        read_grey_image(path)


def test_planar_rgb_tiff(tmp_path: Path) -> None:
    planes = np.zeros((3, 128, 128), np.uint8)
    planes[0] = 255  # pure red: luminance 0.299
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, planes, photometric="rgb", planarconfig="separate")
    assert np.all(read_grey_image(path) == round(0.299 * 255))


# --- CHO-K1 layout ---------------------------------------------------------------------------

ROWS = [
    ("train/nd063_cropxy01t001c1.png", 0),
    ("train/nd063_cropxy01t002c1.png", 3),
    ("train/nd063_cropxy02t001c1.png", 30),
]


def test_read_cho_k1_reads_images_counts_and_names(make_cho_k1_tree: FolderMaker) -> None:
    root = make_cho_k1_tree(ROWS)
    image_set = read_cho_k1(root, "pc", "train")
    assert image_set.names == [name for name, _ in ROWS]
    assert image_set.counts.tolist() == [0, 3, 30]
    assert image_set.modality == "pc" and image_set.domain == "natural"
    assert image_set.images.shape == (3, 128, 128)
    assert image_set.skipped == []
    written = np.asarray(Image.open(root / "pc" / ROWS[1][0]))
    np.testing.assert_array_equal(image_set.images[1], written)
    # the modality folder itself works too
    same = read_cho_k1(root / "pc", "pc", "train")
    np.testing.assert_array_equal(same.images, image_set.images)


def test_read_cho_k1_refuses_other_modality_folder(make_cho_k1_tree: FolderMaker) -> None:
    root = make_cho_k1_tree(ROWS)
    with pytest.raises(DataError, match="pc folder, but modality bf"):
        read_cho_k1(root / "pc", "bf", "train")
    with pytest.raises(DataError, match=r"bf/train\.csv"):
        read_cho_k1(root, "bf", "train")
    with pytest.raises(ConfigError, match="split"):
        read_cho_k1(root, "pc", "validation")  # type: ignore[arg-type]


def test_read_cho_k1_bf_jpeg_with_rgb_image(
    make_cho_k1_tree: FolderMaker, write_image: ImageWriter
) -> None:
    rows = [("train_set1/nd004xy04t002c1.jpg", 0), ("train_set1/nd004xy04t003c1.jpg", 5)]
    root = make_cho_k1_tree(rows, modality="bf")
    rgb = np.full((128, 128, 3), (200, 100, 50), np.uint8)
    write_image(root / "bf" / rows[1][0], rgb)
    image_set = read_cho_k1(root, "bf", "train")
    assert image_set.counts.tolist() == [0, 5]
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert abs(float(image_set.images[1].mean()) - expected) < 2


def _write_csv(root: Path, text: str, modality: str = "pc", split: str = "train") -> Path:
    csv_path = root / modality / f"{split}.csv"
    csv_path.write_text(text, encoding="utf-8")
    return csv_path


GOOD = "train/nd063_cropxy01t001c1.png,0\ntrain/nd063_cropxy01t002c1.png,3\n"


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ("train/nd063_cropxy02t001c1.png,3,extra", "malformed row with 3 field"),
        ("train/nd063_cropxy02t001c1.png", "malformed row with 1 field"),
        ("train/nd063_cropxy02t001c1.png,three", "'three' is not an integer"),
        ("train/nd063_cropxy02t001c1.png,2.5", "'2.5' is not an integer"),
        (",4", "empty file name"),
        ("train/nd063_cropxy02t001c1.png,-1", "negative count -1"),
        ("train/nd063_cropxy02t001c1.png,31", "count 31 .* above the maximum 30"),
        ("train/nd063_cropxy01t001c1.png,2", "listed again \\(first on line 1\\)"),
    ],
)
def test_bad_csv_rows_name_file_and_line(
    make_cho_k1_tree: FolderMaker, bad_row: str, expected: str
) -> None:
    root = make_cho_k1_tree(ROWS)
    csv_path = _write_csv(root, GOOD + bad_row + "\n")
    with pytest.raises(DataError, match=expected) as error:
        read_cho_k1(root, "pc", "train")
    assert f"{csv_path}, line 3" in str(error.value)


def test_max_count_option(make_cho_k1_tree: FolderMaker) -> None:
    root = make_cho_k1_tree(ROWS)
    with pytest.raises(DataError, match=r"count 30 .* above the maximum 20"):
        read_cho_k1(root, "pc", "train", max_count=20)


def test_header_blank_lines_and_crlf_are_accepted(make_cho_k1_tree: FolderMaker) -> None:
    root = make_cho_k1_tree(ROWS)
    _write_csv(root, "path,count\r\n" + GOOD.replace("\n", "\r\n") + "\r\n\r\n")
    assert read_cho_k1(root, "pc", "train").counts.tolist() == [0, 3]


def test_empty_csv_is_an_error(make_cho_k1_tree: FolderMaker) -> None:
    root = make_cho_k1_tree(ROWS)
    csv_path = _write_csv(root, "\n")
    with pytest.raises(DataError, match="no rows") as error:
        read_cho_k1(root, "pc", "train")
    assert str(csv_path) in str(error.value)


def _break_images(root: Path) -> dict[str, str]:
    """Make one image of each bad kind; returns {file name: expected reason}."""
    folder = root / "pc" / "train"
    (folder / "nd063_cropxy01t002c1.png").unlink()
    (folder / "nd063_cropxy02t001c1.png").write_bytes(b"not an image")
    data = _encoded(random_image(9), "PNG")
    (folder / "nd063_cropxy03t001c1.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "nd063_cropxy04t001c1.png")
    return {
        "nd063_cropxy01t002c1.png": "file not found",
        "nd063_cropxy02t001c1.png": "not a readable",
        "nd063_cropxy03t001c1.png": "truncated",
        "nd063_cropxy04t001c1.png": "64x64 pixels, expected 128x128",
    }


BROKEN_ROWS = [
    ("train/nd063_cropxy01t001c1.png", 0),
    ("train/nd063_cropxy01t002c1.png", 2),
    ("train/nd063_cropxy02t001c1.png", 3),
    ("train/nd063_cropxy03t001c1.png", 4),
    ("train/nd063_cropxy04t001c1.png", 5),
    ("train/nd063_cropxy05t001c1.png", 6),
]


def test_each_bad_image_raises_with_file_and_line(make_cho_k1_tree: FolderMaker) -> None:
    root = make_cho_k1_tree(BROKEN_ROWS)
    reasons = _break_images(root)
    csv_path = root / "pc" / "train.csv"
    for line, (name, reason) in enumerate(reasons.items(), start=2):
        with pytest.raises(DataError, match=reason) as error:
            read_cho_k1(root, "pc", "train")
        message = str(error.value)
        assert name in message and f"{csv_path}, line {line}" in message
        # repair this one so the next read stops at the next bad image
        (root / "pc" / "train" / name).unlink(missing_ok=True)
        Image.fromarray(random_image(line)).save(root / "pc" / "train" / name)


def test_skip_bad_warns_once_listing_every_skipped_input(make_cho_k1_tree: FolderMaker) -> None:
    root = make_cho_k1_tree(BROKEN_ROWS)
    reasons = _break_images(root)
    with open(root / "pc" / "train.csv", "a", encoding="utf-8") as csv_file:
        csv_file.write("train/nd063_cropxy05t002c1.png,-4\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image_set = read_cho_k1(root, "pc", "train", skip_bad=True)
    skip_warnings = [w for w in caught if issubclass(w.category, SkippedInputWarning)]
    assert len(skip_warnings) == 1
    text = str(skip_warnings[0].message)
    for name, reason in reasons.items():
        assert name in text and reason in text
    assert "line 7: negative count -4" in text
    assert "skipped 5 bad input(s)" in text
    assert image_set.names == [BROKEN_ROWS[0][0], BROKEN_ROWS[5][0]]
    assert image_set.counts.tolist() == [0, 6]
    assert len(image_set.skipped) == 5
    assert all(any(name in entry for entry in image_set.skipped) for name in reasons)


def test_skip_bad_with_nothing_left_is_an_error(make_cho_k1_tree: FolderMaker) -> None:
    root = make_cho_k1_tree(ROWS)
    _write_csv(root, "missing_a.png,1\nmissing_b.png,2\n")
    with (
        pytest.warns(SkippedInputWarning, match="missing_b.png"),
        pytest.raises(DataError, match="no usable images"),
    ):
        read_cho_k1(root, "pc", "train", skip_bad=True)


# --- generic layout --------------------------------------------------------------------------


def test_read_image_folder_lists_sorted_top_level_images(
    make_image_folder: FolderMaker, write_image: ImageWriter
) -> None:
    folder = make_image_folder(["b.png", "a.TIF", "c.jpeg", "d.JPG"], counts={"b.png": 4})
    write_image(folder / "sub" / "e.png", random_image(0))  # subfolders are not read
    (folder / "notes.txt").write_text("not an image")
    image_set = read_image_folder(folder)
    assert image_set.names == ["a.TIF", "b.png", "c.jpeg", "d.JPG"]
    assert image_set.counts.tolist() == [0, 4, 0, 0]
    np.testing.assert_array_equal(image_set.images[1], random_image(0))
    assert image_set.source == str(folder)


def test_read_image_folder_without_counts_or_with_headerless_counts(
    make_image_folder: FolderMaker,
) -> None:
    folder = make_image_folder(["x.png", "y.png"])
    assert read_image_folder(folder).counts.tolist() == [0, 0]
    (folder / "counts.csv").write_text("y.png,7\n")
    assert read_image_folder(folder).counts.tolist() == [0, 7]


def test_counts_csv_naming_a_missing_file(make_image_folder: FolderMaker) -> None:
    folder = make_image_folder(["x.png"], counts={"x.png": 1, "gone.png": 2})
    with pytest.raises(DataError, match=r"line 3: names 'gone\.png' \(no such file\)") as error:
        read_image_folder(folder)
    assert str(folder / "counts.csv") in str(error.value)
    with pytest.warns(SkippedInputWarning, match="gone.png"):
        image_set = read_image_folder(folder, skip_bad=True)
    assert image_set.counts.tolist() == [1]
    assert len(image_set.skipped) == 1


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        read_image_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="folder not found"):
        read_image_folder(tmp_path / "absent")


def test_generic_folder_bad_images(make_image_folder: FolderMaker) -> None:
    folder = make_image_folder(["a.png", "b.png"], counts={"a.png": 2})
    (folder / "b.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"b\.png: not a readable"):
        read_image_folder(folder)
    with pytest.warns(SkippedInputWarning, match="b.png"):
        image_set = read_image_folder(folder, skip_bad=True)
    assert image_set.names == ["a.png"]


def test_generic_folder_resize(make_image_folder: FolderMaker) -> None:
    folder = make_image_folder(["a.png"], size=200)
    with pytest.raises(DataError, match="200x200 pixels, expected 128x128"):
        read_image_folder(folder)
    assert read_image_folder(folder, resize=True).images.shape == (1, 128, 128)


# --- dispatch --------------------------------------------------------------------------------


def test_load_image_set_dispatches_on_layout(
    make_cho_k1_tree: FolderMaker, make_image_folder: FolderMaker
) -> None:
    root = make_cho_k1_tree(ROWS)
    from_csv = load_image_set(root / "pc" / "train.csv")
    assert from_csv.modality == "pc" and len(from_csv) == 3
    assert len(load_image_set(root / "pc", split="train")) == 3
    assert len(load_image_set(root, modality="pc", split="train")) == 3
    with pytest.raises(ConfigError, match="choose a split"):
        load_image_set(root / "pc")
    with pytest.raises(ConfigError, match="choose a modality"):
        load_image_set(root, split="train")
    folder = make_image_folder(["a.png"], counts={"a.png": 2})
    assert load_image_set(folder).counts.tolist() == [2]
    assert load_image_set(folder / "counts.csv").counts.tolist() == [2]


def test_load_image_set_explains_unknown_layouts(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="matches no known layout"):
        load_image_set(tmp_path / "nothing")
    with pytest.raises(DataError, match="not found"):
        load_image_set(tmp_path / "absent")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(DataError, match="not a CSV"):
        load_image_set(tmp_path / "model.pt")


# --- cache -----------------------------------------------------------------------------------


def _decoder_must_not_run(path: Path, size: int, resize: bool) -> np.ndarray:
    raise AssertionError(f"decoded {path} although it was cached")


def test_second_read_uses_the_cache(
    make_cho_k1_tree: FolderMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_cho_k1_tree(ROWS)
    cache = tmp_path / "cache"
    first = read_cho_k1(root, "pc", "train", cache_dir=cache)
    assert len(list(cache.glob("decoded-*.npz"))) == 1
    monkeypatch.setattr(readers, "_decode_grey", _decoder_must_not_run)
    second = read_cho_k1(root, "pc", "train", cache_dir=cache)
    np.testing.assert_array_equal(second.images, first.images)
    assert second.counts.tolist() == first.counts.tolist()
    with pytest.raises(AssertionError, match="although it was cached"):  # other options: a miss
        read_cho_k1(root, "pc", "train", cache_dir=cache, resize=True)


def test_changed_file_invalidates_the_cache(make_cho_k1_tree: FolderMaker, tmp_path: Path) -> None:
    root = make_cho_k1_tree(ROWS)
    cache = tmp_path / "cache"
    read_cho_k1(root, "pc", "train", cache_dir=cache)
    changed = root / "pc" / ROWS[2][0]
    new_pixels = np.full((128, 128), 77, np.uint8)
    Image.fromarray(new_pixels).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    again = read_cho_k1(root, "pc", "train", cache_dir=cache)
    np.testing.assert_array_equal(again.images[2], new_pixels)
    assert len(list(cache.glob("decoded-*.npz"))) == 2


def test_corrupt_cache_entry_is_ignored(make_cho_k1_tree: FolderMaker, tmp_path: Path) -> None:
    root = make_cho_k1_tree(ROWS)
    cache = tmp_path / "cache"
    first = read_cho_k1(root, "pc", "train", cache_dir=cache)
    (entry,) = cache.glob("decoded-*.npz")
    entry.write_bytes(b"garbage")
    again = read_cho_k1(root, "pc", "train", cache_dir=cache)
    np.testing.assert_array_equal(again.images, first.images)


def test_skipped_inputs_survive_the_cache(make_cho_k1_tree: FolderMaker, tmp_path: Path) -> None:
    root = make_cho_k1_tree(ROWS)
    (root / "pc" / ROWS[0][0]).write_bytes(b"broken")
    cache = tmp_path / "cache"
    for _ in range(2):
        with pytest.warns(SkippedInputWarning, match="nd063_cropxy01t001c1.png"):
            image_set = read_cho_k1(root, "pc", "train", cache_dir=cache, skip_bad=True)
        assert image_set.counts.tolist() == [3, 30]
    with pytest.raises(DataError, match="not a readable"):
        read_cho_k1(root, "pc", "train", cache_dir=cache)


# --- real data -------------------------------------------------------------------------------


@pytest.mark.real_data
def test_real_cho_k1_label_numbers(cho_k1_root: Path) -> None:
    expected = {
        ("pc", "train"): (209, 2943),
        ("pc", "test"): (398, 394),
        ("bf", "train"): (281, 2188),
        ("bf", "test"): (290, 224),
    }
    for (modality, split), (labelled, unlabelled) in expected.items():
        image_set = read_cho_k1(cho_k1_root, modality, split)  # type: ignore[arg-type]
        assert int(image_set.labelled.sum()) == labelled, (modality, split)
        assert int((~image_set.labelled).sum()) == unlabelled, (modality, split)
        assert image_set.images.shape[1:] == (128, 128)
        assert image_set.counts[image_set.labelled].min() >= 1
        assert image_set.counts.max() <= 30
    pc_mean = read_cho_k1(cho_k1_root / "pc", "pc", "test").images.mean() / 255
    assert 0.18 < pc_mean < 0.28  # README: PC natural about 0.23


def test_reads_what_the_writer_writes(tmp_path: Path) -> None:
    writer = pytest.importorskip("twinvae.data.writer")
    from twinvae.data.imageset import ImageSet

    original = ImageSet(
        images=np.stack([random_image(seed) for seed in range(4)]),
        counts=np.array([0, 2, 0, 30]),
        names=[f"img_{index:03d}.png" for index in range(4)],
    )
    writer.write_image_folder(original, tmp_path / "out")
    read_back = read_image_folder(tmp_path / "out")
    assert read_back.names == original.names
    assert read_back.counts.tolist() == [0, 2, 0, 30]
    np.testing.assert_array_equal(read_back.images, original.images)


# --- progress ----------------------------------------------------------------------------------


def test_readers_and_writer_report_progress_through_the_installed_display(
    tmp_path: Path, make_image_folder: FolderMaker
) -> None:
    """The data layer reports through twinvae.progress, so any front end can show it."""
    from twinvae.data.imageset import ImageSet
    from twinvae.data.writer import write_image_folder
    from twinvae.progress import use_display

    opened: list[tuple[str, int | None]] = []
    steps: list[int] = []

    class Recorder:
        def advance(self, count: int = 1) -> None:
            steps.append(count)

        def describe(self, description: str) -> None:
            pass

    @contextmanager
    def display(description: str, total: int | None) -> Iterator[Recorder]:
        opened.append((description, total))
        yield Recorder()

    folder = make_image_folder(["a.png", "b.png", "c.png"])
    with use_display(display):
        read_image_folder(folder, progress=True)
        assert opened == [(f"Reading {folder.parent.name}/{folder.name}", 3)]
        assert sum(steps) == 3
        images = ImageSet(np.zeros((2, 8, 8), np.uint8), np.array([1, 0]), ["x.png", "y.png"])
        write_image_folder(images, tmp_path / "written", progress=True)
        read_image_folder(folder, progress=False)  # silent: opens no bar
    assert len(opened) == 2 and opened[1][1] == 2
    assert sum(steps) == 5


def test_data_layer_never_imports_the_cli() -> None:
    """Library code must not depend on the command line (rich, typer, twinvae.cli)."""
    folder = Path(readers.__file__).parent
    for module in sorted(folder.glob("*.py")):
        assert "twinvae.cli" not in module.read_text(encoding="utf-8"), module.name
