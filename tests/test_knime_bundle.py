"""The standalone bundle opener and ONNX runner (twinvae.runtime.twinvae_bundle), shipped with the
KNIME workflows."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from twinvae.knime.testkit import bundle_rdf, write_mean_intensity_bundle
from twinvae.runtime import twinvae_bundle as tb


def expected_counts(images: np.ndarray, scale: float = 10.0) -> np.ndarray:
    return scale * (images.astype(np.float32) / np.float32(255.0)).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mean_intensity_bundle(tmp_path_factory.mktemp("bundle") / "model.zip")


@pytest.fixture(scope="module")
def predictor(bundle: Path) -> tb.BundlePredictor:
    return tb.BundlePredictor(bundle, providers=["CPUExecutionProvider"], batch_size=3)


def test_bundle_info_is_read_generically_from_rdf(bundle: Path) -> None:
    info = tb.read_bundle_info(bundle)
    assert info.input_id == "raw"
    assert info.input_axes == ("batch", "channel", "y", "x")
    assert info.input_size == (128, 128)
    assert info.output_ids == ("count", "mu")
    assert info.onnx_file == "weights.onnx"
    assert [step["id"] for step in info.preprocessing] == ["ensure_dtype", "scale_linear"]


def test_predict_arrays_matches_the_model_formula(predictor: tb.BundlePredictor) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 128, 128), dtype=np.uint8)  # 3 batches of <= 3
    counts = predictor.predict_arrays(images)
    assert counts.shape == (7,) and counts.dtype == np.float32
    np.testing.assert_allclose(counts, expected_counts(images), rtol=1e-4)
    assert predictor.providers == ["CPUExecutionProvider"]
    assert predictor.name == "Tiny mean-intensity counter"


def test_predict_files_reads_and_keeps_order(predictor: tb.BundlePredictor, tmp_path: Path) -> None:
    values = [10, 200, 60, 255, 0]
    paths = []
    for index, value in enumerate(values):
        path = tmp_path / f"img{index}.png"
        Image.fromarray(np.full((128, 128), value, dtype=np.uint8)).save(path)
        paths.append(path)
    seen: list[tuple[int, int]] = []
    results = predictor.predict_files(
        paths, progress=lambda done, total: seen.append((done, total))
    )
    assert [file for file, _ in results] == [str(path) for path in paths]
    np.testing.assert_allclose(
        [count for _, count in results], [10 * v / 255 for v in values], rtol=1e-4
    )
    assert seen == [(3, 5), (5, 5)]


def test_image_conversions(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    expected_grey = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)
    assert abs(int(tb.read_grey_image(tmp_path / "rgb.png")[0, 0]) - expected_grey) <= 1
    sixteen = np.full((8, 8), 65535, dtype=np.uint16)
    sixteen[0, 0] = 257 * 10
    tifffile.imwrite(tmp_path / "deep.tif", sixteen)
    grey = tb.read_grey_image(tmp_path / "deep.tif")
    assert grey.dtype == np.uint8 and grey[0, 0] == 10 and grey[1, 1] == 255
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    assert tb.read_grey_image(tmp_path / "deep.png")[0, 0] == 10
    tifffile.imwrite(tmp_path / "float.tif", np.full((8, 8), 0.5, dtype=np.float32))
    assert tb.read_grey_image(tmp_path / "float.tif")[0, 0] == 128
    tifffile.imwrite(
        tmp_path / "rgb_first.tif",
        np.moveaxis(rgb, -1, 0),
        photometric="rgb",
        planarconfig="separate",
    )
    assert abs(int(tb.read_grey_image(tmp_path / "rgb_first.tif")[3, 3]) - expected_grey) <= 1


def test_other_sizes_are_resized_or_rejected(predictor: tb.BundlePredictor) -> None:
    image = np.full((64, 96), 51, dtype=np.uint8)
    resized = tb.to_model_input(image, (128, 128))
    assert resized.shape == (128, 128) and int(resized.mean()) == 51
    with pytest.raises(tb.BundleError, match="96x64 pixels; the model needs 128x128"):
        tb.to_model_input(image, (128, 128), resize=False, source="small.png")
    np.testing.assert_allclose(predictor.predict_arrays(image[None]), [10 * 51 / 255], rtol=1e-4)


@pytest.mark.parametrize(
    ("steps", "reference"),
    [
        (
            [{"id": "scale_range", "kwargs": {"min_percentile": 0, "max_percentile": 100}}],
            lambda x: (x - x.min()) / (x.max() - x.min() + 1e-6),
        ),
        (
            [{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["channel", "y", "x"]}}],
            lambda x: (x - x.mean()) / (x.std() + 1e-6),
        ),
        (
            [{"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": 100.0, "std": 50.0}}],
            lambda x: (x - 100.0) / (50.0 + 1e-6),
        ),
        ([{"id": "clip", "kwargs": {"min": 20, "max": 90}}], lambda x: np.clip(x, 20, 90)),
        (
            [
                {"id": "scale_linear", "kwargs": {"gain": [2.0], "offset": 1.0}},
                {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
            ],
            lambda x: x * 2.0 + 1.0,
        ),
    ],
)
def test_processing_steps_per_image(
    steps: list[dict[str, Any]], reference: Callable[[np.ndarray], np.ndarray]
) -> None:
    rng = np.random.default_rng(2)
    batch = rng.integers(0, 256, size=(2, 1, 16, 16)).astype(np.float64)
    result = tb.apply_processing(batch, steps, ("batch", "channel", "y", "x"))
    for index in range(2):  # statistics are per image, never across the batch
        np.testing.assert_allclose(result[index], reference(batch[index]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"id": "binarize", "kwargs": {"threshold": 0.5}}], "not supported here; supported"),
        ([{"id": "scale_linear", "kwargs": {"gain": [1.0, 2.0]}}], "per-axis values"),
        ([{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["batch", "y"]}}], "batch axis"),
        ([{"id": "scale_range", "kwargs": {"reference_tensor": "raw"}}], "per-image"),
        ([{"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": 1.0}}], "'std'"),
    ],
)
def test_unsupported_processing_fails_clearly(steps: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(tb.BundleError, match=message):
        tb.apply_processing(np.zeros((1, 1, 4, 4)), steps, ("batch", "channel", "y", "x"))


def test_bundle_with_other_preprocessing_runs_it(tmp_path: Path) -> None:
    steps = [
        {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
        {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["channel", "y", "x"], "eps": 1e-6}},
    ]
    path = write_mean_intensity_bundle(tmp_path / "zmuv.zip", preprocessing=steps)
    predictor = tb.BundlePredictor(path)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(2, 128, 128), dtype=np.uint8)
    np.testing.assert_allclose(predictor.predict_arrays(images), [0.0, 0.0], atol=1e-4)


def test_folder_bundle_and_fixed_batch_model(tmp_path: Path) -> None:
    path = write_mean_intensity_bundle(tmp_path / "fixed.zip", fixed_batch=1)
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(path) as zipped:
        zipped.extractall(folder)
    predictor = tb.BundlePredictor(folder, batch_size=8)
    assert predictor.batch_size == 1
    images = np.stack([np.full((128, 128), v, dtype=np.uint8) for v in (0, 51, 255)])
    np.testing.assert_allclose(predictor.predict_arrays(images), [0.0, 2.0, 10.0], rtol=1e-4)


def test_torch_exported_bundle_runs(tmp_path: Path) -> None:
    path = write_mean_intensity_bundle(tmp_path / "torch.zip", scale=4.0, exporter="torch")
    images = np.stack([np.full((128, 128), 255, dtype=np.uint8), np.zeros((128, 128), np.uint8)])
    np.testing.assert_allclose(
        tb.BundlePredictor(path).predict_arrays(images), [4.0, 0.0], atol=1e-5
    )


def test_broken_bundles_fail_with_the_file_named(tmp_path: Path, bundle: Path) -> None:
    with pytest.raises(tb.BundleError, match="does not exist"):
        tb.read_bundle_info(tmp_path / "nope.zip")
    (tmp_path / "plain.zip").write_bytes(b"not a zip")
    with pytest.raises(tb.BundleError, match="is not a zip archive"):
        tb.read_bundle_info(tmp_path / "plain.zip")
    rdf = bundle_rdf()
    del rdf["weights"]["onnx"]
    broken = tmp_path / "no_onnx.zip"
    with zipfile.ZipFile(broken, "w") as zipped:
        zipped.writestr("rdf.yaml", yaml.safe_dump(rdf))
    with pytest.raises(tb.BundleError, match="weights: onnx: source"):
        tb.read_bundle_info(broken)
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(bundle) as source, zipfile.ZipFile(tampered, "w") as target:
        target.writestr("rdf.yaml", source.read("rdf.yaml"))
        target.writestr("weights.onnx", source.read("weights.onnx") + b"\0")
    with pytest.raises(tb.BundleError, match="sha256"):
        tb.BundlePredictor(tampered)


def test_missing_package_message_says_what_to_install() -> None:
    with pytest.raises(tb.MissingPackageError, match=r"pip install no_such_pkg_xyz.*conda install"):
        tb.require("no_such_pkg_xyz")
    assert "pip install onnxruntime" in tb.install_hint("onnxruntime")
    assert "pip install pyyaml" in tb.install_hint("yaml")


def test_list_images_is_sorted_and_recursive(tmp_path: Path) -> None:
    for name in ["b.png", "a.TIF", "sub/c.jpg", "notes.txt", ".hidden.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [path.relative_to(tmp_path).as_posix() for path in tb.list_images(tmp_path)]
    assert found == ["a.TIF", "b.png", "sub/c.jpg"]
    with pytest.raises(tb.BundleError, match="does not exist"):
        tb.list_images(tmp_path / "missing")


def test_runner_is_standalone_without_torch_or_twinvae(tmp_path: Path, bundle: Path) -> None:
    """The file the workflows ship runs with numpy + onnxruntime (no torch, no twinvae), and
    twinvae.runtime imports without torch."""
    shutil.copy(tb.__file__, tmp_path / "twinvae_bundle.py")
    block = "import sys\nfor name in ('torch', 'twinvae'):\n    sys.modules[name] = None\n"
    standalone = (
        f"{block}sys.path.insert(0, {str(tmp_path)!r})\n"
        "import numpy as np, twinvae_bundle\n"
        f"predictor = twinvae_bundle.BundlePredictor({str(bundle)!r})\n"
        "print(float(predictor.predict_arrays(np.full((1, 128, 128), 51, np.uint8))[0]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", standalone], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(10 * 51 / 255, rel=1e-4)
    in_package = "import sys\nsys.modules['torch'] = None\nimport twinvae.runtime.twinvae_bundle\n"
    done = subprocess.run(
        [sys.executable, "-c", in_package], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
