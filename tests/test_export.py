"""Export of bioimage.io bundles, their validation, and prediction from them (tiny models)."""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from twinvae.cli.main import app
from twinvae.config import ExperimentConfig
from twinvae.errors import DataError, ExportError, SkippedInputWarning
from twinvae.evaluation.metrics import round_counts
from twinvae.export import ExportOptions, export_bundle, validate_bundle
from twinvae.export import checks as checks_module
from twinvae.export.checks import SPREAD_MIN_FRACTION, SPREAD_MIN_STD, prediction_spread
from twinvae.export.network import ARCHITECTURE_FILE, load_standalone_class
from twinvae.export.predict import evaluate_bundle, predict_bundle_arrays
from twinvae.models.twin_vae import ModelConfig, TwinVAE
from twinvae.training.checkpoint import Checkpoint, load_model, save_checkpoint

TINY = ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,), standardize_input=True)
TIMESTAMP = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
runner = CliRunner()


def _write_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = TwinVAE(TINY)
    checkpoint = Checkpoint(
        config=ExperimentConfig(name="tiny-pc", model=TINY),
        model_state=model.state_dict(),
        epoch=3,
        metrics={"val_mae": 1.25, "val_accuracy": 0.5},
    )
    save_checkpoint(checkpoint, path)
    return path


def _pytorch_counts(checkpoint: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model, _ = load_model(checkpoint)
    batch = torch.from_numpy(images.astype(np.float32)[:, None] / 255.0)
    with torch.no_grad():
        mu, _ = model.encode(batch, "natural")
        counts = model.regress(mu)
    return counts.numpy(), mu.numpy()


def _images(count: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 128, 128), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def _refuse_network(calls: list[str]) -> Callable[..., Any]:
    def refuse(*args: object, **kwargs: object) -> Any:
        calls.append(repr(args[-1] if args else kwargs))
        raise OSError("network access is not allowed in this test")

    return refuse


@pytest.fixture(scope="module")
def bundle(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bundle (with the mu output) shared by the read-only tests, exported with the CLI
    over an existing file (--overwrite), with every network connection refused."""
    folder = tmp_path_factory.mktemp("bundle")
    out = folder / "tiny-pc.zip"
    out.write_bytes(b"an older bundle")
    metrics = tmp_path_factory.mktemp("metrics") / "test.json"
    metrics.write_text(json.dumps({"test": {"mae": 2.5, "accuracy": 0.25}}), encoding="utf-8")
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refuse_network(calls))
        patch.setattr(socket, "getaddrinfo", _refuse_network(calls))
        result = runner.invoke(
            app,
            [
                "export",
                str(checkpoint),
                "--out",
                str(out),
                "--with-mu",
                "--metrics",
                str(metrics),
                "--timestamp",
                TIMESTAMP.isoformat(),
                "--check-images",
                "6",
                "--overwrite",
                "--no-progress",
            ],
        )
    assert result.exit_code == 0, result.output
    assert calls == []  # nothing tried to reach the network
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in result.output
    assert "FAILED" not in result.output and "bioimageio.core test" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["tiny-pc.zip"]  # no temporary leftovers
    return out


def _rdf(bundle_path: Path) -> dict:
    with zipfile.ZipFile(bundle_path) as archive:
        return yaml.safe_load(archive.read("rdf.yaml"))


def test_bundle_follows_the_contract(bundle: Path, checkpoint: Path) -> None:
    rdf = _rdf(bundle)
    assert rdf["format_version"].startswith("0.5.")
    (raw,) = rdf["inputs"]
    assert raw["id"] == "raw"
    assert [a["type"] for a in raw["axes"]] == ["batch", "channel", "space", "space"]
    assert raw["axes"][1]["channel_names"] == ["grey"]
    assert [a.get("size") for a in raw["axes"][2:]] == [128, 128]
    assert raw["data"]["type"] == "float32"
    assert raw["preprocessing"] == [
        {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
        {"id": "scale_linear", "kwargs": {"gain": 1 / 255, "offset": 0.0}},
    ]
    count, mu = rdf["outputs"]
    assert count["id"] == "count" and [a["type"] for a in count["axes"]] == ["batch", "channel"]
    assert mu["id"] == "mu" and len(mu["axes"][1]["channel_names"]) == TINY.latent_dim
    weights = rdf["weights"]
    assert set(weights) == {"onnx", "torchscript", "pytorch_state_dict"}
    assert weights["onnx"]["parent"] == weights["torchscript"]["parent"] == "pytorch_state_dict"
    assert weights["onnx"]["opset_version"] >= 17
    assert weights["pytorch_state_dict"]["architecture"]["source"] == ARCHITECTURE_FILE
    assert {c["doi"] for c in rdf["cite"]} == {
        "10.1093/bioinformatics/btab386",
        "10.1007/s00521-022-08115-2",
    }
    assert rdf["license"] and rdf["tags"] and rdf["version"] and rdf["authors"]
    assert rdf["timestamp"].startswith("2024-05-01T12:00:00")
    for tolerance in rdf["config"]["bioimageio"]["reproducibility_tolerance"]:
        assert tolerance["mismatched_elements_per_million"] == 0
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
        assert names[0] == "rdf.yaml" and all("/" not in n for n in names)
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        readme = archive.read("README.md").decode()
        config = yaml.safe_load(archive.read("config.yaml"))
        cover = Image.open(io.BytesIO(archive.read("cover.png")))
        onnx_bytes = archive.read("weights.onnx")
        test_input = np.load(io.BytesIO(archive.read("test_input.npy")))
        test_count = np.load(io.BytesIO(archive.read("test_output_count.npy")))
    assert "# Validation" in readme and "val_mae" in readme and "test.mae" in readme
    assert "bioimageio test" in readme and "twinvae predict" in readme and "KNIME" in readme
    assert "10.1093/bioinformatics/btab386" in readme and "Limitations" in readme
    assert config["name"] == "tiny-pc" and config["model"]["latent_dim"] == TINY.latent_dim
    assert cover.format == "PNG" and cover.size[0] == 2 * cover.size[1]
    assert b"/work/" not in onnx_bytes  # no machine paths (stack traces) in the weights
    assert test_input.shape == (1, 1, 128, 128) and test_input.dtype == np.float32
    assert test_input.max() > 1.0  # raw 0..255 values, scaled by the preprocessing
    expected, _ = _pytorch_counts(checkpoint, test_input[:, 0].astype(np.uint8))
    np.testing.assert_allclose(test_count.reshape(-1), expected.reshape(-1), atol=1e-5)


def test_metrics_json_accepts_an_evaluate_report(tmp_path: Path) -> None:
    from twinvae.export.bundle import load_metrics_json

    report = tmp_path / "report.json"
    report.write_text(
        json.dumps(
            {
                "overall": {"n": 4, "mae": 0.5, "mre": 0.1, "accuracy": 0.75},
                "per_count": {"3": {"n": 4, "mae": 0.5}},
                "predictions": [{"file": "a.png", "count": 3, "predicted": 2.6}],
            }
        )
    )
    assert load_metrics_json(report) == {"n": 4.0, "mae": 0.5, "mre": 0.1, "accuracy": 0.75}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mae": "low"}))
    with pytest.raises(ExportError, match="expected a number"):
        load_metrics_json(bad)


def test_round_trip_same_counts_as_pytorch(bundle: Path, checkpoint: Path) -> None:
    from bioimageio.core import load_model_description, predict

    images = _images(5)
    expected_counts, expected_mu = _pytorch_counts(checkpoint, images)

    model = load_model_description(bundle)
    for index in range(2):
        sample = predict(model=model, inputs={"raw": images[index][None, None].astype(np.float32)})
        count = float(sample.members["count"].data.squeeze())
        mu = np.asarray(sample.members["mu"].data).reshape(-1)
        assert abs(count - expected_counts[index]) <= 1e-4
        np.testing.assert_allclose(mu, expected_mu[index], atol=1e-4)

    onnx_counts = predict_bundle_arrays(bundle, images, batch_size=2)
    np.testing.assert_allclose(onnx_counts, expected_counts, atol=1e-4)

    from twinvae.data.imageset import ImageSet

    image_set = ImageSet(images=images, counts=np.zeros(5), names=[f"{i}.png" for i in range(5)])
    np.testing.assert_allclose(evaluate_bundle(bundle, image_set), expected_counts, atol=1e-4)


def test_state_dict_weights_are_standalone(bundle: Path, checkpoint: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(tmp_path)
    rdf = yaml.safe_load((tmp_path / "rdf.yaml").read_text())
    source = (tmp_path / ARCHITECTURE_FILE).read_text()
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"__future__", "collections", "torch", "typing"}
    state = torch.load(tmp_path / "weights.pt", map_location="cpu", weights_only=True)
    architecture = rdf["weights"]["pytorch_state_dict"]["architecture"]
    network = load_standalone_class(tmp_path / ARCHITECTURE_FILE)(**architecture["kwargs"])
    network.load_state_dict(state, strict=True)
    network.eval()
    images = _images(3, seed=11)
    with torch.no_grad():
        counts, mu = network(torch.from_numpy(images.astype(np.float32)[:, None] / 255.0))
    expected_counts, expected_mu = _pytorch_counts(checkpoint, images)
    np.testing.assert_allclose(counts.numpy().reshape(-1), expected_counts, atol=1e-5)
    np.testing.assert_allclose(mu.numpy(), expected_mu, atol=1e-5)


def _repack(source: Path, target: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    folder = target.parent / (target.stem + "_files")
    with zipfile.ZipFile(source) as archive:
        archive.extractall(folder)
    edit(folder)
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, path.name)
    return target


def _tamper_onnx(folder: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "weights.onnx"))
    initializer = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(initializer).copy()
    initializer.CopyFrom(numpy_helper.from_array(values + np.float32(0.05), initializer.name))
    onnx.save_model(model, str(folder / "weights.onnx"))


def _update_sha(folder: Path, file_name: str) -> None:
    rdf_path = folder / "rdf.yaml"
    text = rdf_path.read_text()
    rdf = yaml.safe_load(text)
    digest = hashlib.sha256((folder / file_name).read_bytes()).hexdigest()
    old = rdf["weights"]["onnx"]["sha256"]
    rdf_path.write_text(text.replace(old, digest))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong-sha", "weights.onnx does not match its sha256"),
        ("missing-file", "file 'weights_torchscript.pt' is missing"),
        ("no-rdf", "no rdf.yaml at the top level"),
    ],
)
def test_validate_rejects_broken_bundles(
    bundle: Path, tmp_path: Path, case: str, expected: str
) -> None:
    edits = {
        "wrong-sha": _tamper_onnx,
        "missing-file": lambda folder: (folder / "weights_torchscript.pt").unlink(),
        "no-rdf": lambda folder: (folder / "rdf.yaml").rename(folder / "model.yaml"),
    }
    broken = _repack(bundle, tmp_path / f"{case}.zip", edits[case])
    result = runner.invoke(app, ["validate", str(broken), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert expected in " ".join(result.output.split())
    assert "Invalid bundle" in result.output


def test_validate_catches_weights_changed_with_a_matching_sha256(
    bundle: Path, tmp_path: Path
) -> None:
    def tamper(folder: Path) -> None:
        _tamper_onnx(folder)
        _update_sha(folder, "weights.onnx")

    broken = _repack(bundle, tmp_path / "tampered.zip", tamper)
    report = validate_bundle(broken, core_tests=False)
    assert not report.passed
    (agreement,) = [check for check in report.checks if check.name == "agreement"]
    assert not agreement.passed
    assert "onnx differs from the torchscript" in agreement.detail  # no code run by default
    trusted = validate_bundle(broken, core_tests=False, trust_code=True)
    (agreement,) = [check for check in trusted.checks if check.name == "agreement"]
    assert "onnx differs from the pytorch_state_dict" in agreement.detail


def test_validate_accepts_the_exported_bundle(bundle: Path) -> None:
    report = validate_bundle(bundle, core_tests=False)
    assert report.passed, report.failure_message()
    names = [check.name for check in report.checks]
    assert names == [
        "package",
        "files",
        "contract",
        "bioimageio format",
        "onnx",
        "agreement",
        "full weights",
        "pytorch_state_dict weights",
        "prediction spread",
    ]
    assert [check.name for check in report.skipped()] == ["pytorch_state_dict weights"]
    (agreement,) = [check for check in report.checks if check.name == "agreement"]
    assert "vs torchscript: onnx" in agreement.detail  # the state dict was not run
    trusted = validate_bundle(bundle, core_tests=False, trust_code=True)
    assert trusted.passed and not trusted.skipped(), trusted.failure_message()
    (agreement,) = [check for check in trusted.checks if check.name == "agreement"]
    assert "vs pytorch_state_dict: torchscript" in agreement.detail


def _with_architecture_lines(source: Path, target: Path, lines: str) -> Path:
    """The bundle with Python lines added to its architecture file (sha256 in rdf.yaml updated,
    so that only running the file can tell)."""

    def edit(folder: Path) -> None:
        architecture = folder / ARCHITECTURE_FILE
        future = "from __future__ import annotations\n"
        architecture.write_text(architecture.read_text().replace(future, future + lines, 1))
        rdf_path = folder / "rdf.yaml"
        entry = yaml.safe_load(rdf_path.read_text())["weights"]["pytorch_state_dict"]
        digest = hashlib.sha256(architecture.read_bytes()).hexdigest()
        rdf_path.write_text(rdf_path.read_text().replace(entry["architecture"]["sha256"], digest))

    return _repack(source, target, edit)


def test_validate_runs_no_code_from_the_bundle_without_trust_code(
    bundle: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "architecture-ran.txt"
    payload = f"with open({str(marker)!r}, 'a') as _log:\n    _log.write('imported\\n')\n"
    hostile = _with_architecture_lines(bundle, tmp_path / "hostile.zip", payload)

    result = runner.invoke(app, ["validate", str(hostile), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not marker.exists(), "validate ran the bundle's architecture file"
    output = " ".join(result.output.split())
    assert "Valid bundle" in output and "--trust-code" in output
    assert (
        "Not checked (see the table): pytorch_state_dict weights, bioimageio.core test "
        "(pytorch_state_dict)" in output
    )
    assert "FAILED" not in output  # onnx and torchscript passed bioimage.io's own test

    trusted = runner.invoke(app, ["validate", str(hostile), "--no-progress", "--trust-code"])
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists() and "Not checked" not in trusted.output
    assert "FAILED" not in trusted.output and "skipped" not in trusted.output


def _constant_checkpoint(path: Path, count: float) -> Path:
    """A checkpoint whose regressor ignores its input: `count` for every image."""
    torch.manual_seed(0)
    model = TwinVAE(TINY)
    last = model.regressor[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(count)
    checkpoint = Checkpoint(
        config=ExperimentConfig(name="flat-pc", model=TINY),
        model_state=model.state_dict(),
        epoch=1,
        metrics={"val_mae": 4.0},
    )
    save_checkpoint(checkpoint, path)
    return path


def test_prediction_spread_flags_almost_constant_counts() -> None:
    labels = np.array([1, 5, 9, 13, 0])  # 0 = unlabelled: not part of the labels' spread
    label_std = float(np.std([1, 5, 9, 13]))
    counting = prediction_spread(labels + 0.3, labels)
    assert not counting.flat and counting.label_std == pytest.approx(label_std)
    constant = prediction_spread(np.full(5, 9.72, dtype=np.float32), labels)
    assert constant.flat and constant.std == 0 and constant.mean == pytest.approx(9.72)
    weak = prediction_spread(np.array([9.0, 9.1, 9.2, 9.3, 9.4]), labels)
    assert weak.flat and weak.threshold == pytest.approx(SPREAD_MIN_FRACTION * label_std)
    unlabelled = prediction_spread(np.array([9.0, 9.1, 9.2]))
    assert not unlabelled.flat and unlabelled.threshold == SPREAD_MIN_STD
    assert prediction_spread(np.array([9.0, 9.01, 9.02])).flat  # below 0.05 cells
    assert not prediction_spread(np.array([9.72])).flat  # one image has no spread to measure


def test_a_constant_predictor_exports_and_validates_with_a_loud_alert(tmp_path: Path) -> None:
    checkpoint = _constant_checkpoint(tmp_path / "best.pt", 9.72)
    out = tmp_path / "flat.zip"
    exported = runner.invoke(
        app,
        ["export", str(checkpoint), "--out", str(out), "--check-images", "6", "--no-progress"],
    )
    assert exported.exit_code == 0, exported.output
    assert out.is_file()  # still written
    lines = [" ".join(line.split()) for line in exported.output.splitlines()]
    text = " ".join(lines)
    assert (
        "ALERT: the model predicts (almost) the same count for every image: std 0 cells, "
        "mean 9.72, over 6 check images" in text
    )
    assert "ALERT" in lines[-1] or "ALERT" in " ".join(lines[-6:])  # the last word of export

    validated = runner.invoke(app, ["validate", str(out), "--no-progress"])
    assert validated.exit_code == 0, validated.output
    text = " ".join(validated.output.split())
    assert (
        "ALERT: the model predicts (almost) the same count for every image: std 0 cells, "
        "mean 9.72, over 16 generated natural-style PC images" in text
    )
    report = validate_bundle(out, core_tests=False)
    assert report.passed and len(report.alerts) == 1 and "9.72" in report.alerts[0]


def test_export_refuses_to_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.zip"
    out.write_bytes(b"precious")
    with pytest.raises(ExportError, match="file exists"):
        export_bundle(checkpoint, out)
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out), "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, ExportError)
    assert "--overwrite" in str(result.exception)
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]


def test_no_partial_file_when_a_check_fails(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_check(bundle: object) -> object:
        raise checks_module._CheckError("forced failure for the test")

    monkeypatch.setattr(checks_module, "_check_files", failing_check)
    out = tmp_path / "model.zip"
    with pytest.raises(ExportError, match="files: forced failure for the test"):
        export_bundle(checkpoint, out, ExportOptions(check_images=2))
    assert list(tmp_path.iterdir()) == []


def test_predict_writes_counts_csv(bundle: Path, checkpoint: Path, tmp_path: Path) -> None:
    images = _images(4, seed=3)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "a.png", folder / "b.tif", folder / "sub" / "c.png"]
    for path, image in zip(paths, images, strict=False):
        Image.fromarray(image).save(path)
    single = tmp_path / "single.png"
    Image.fromarray(images[3]).save(single)
    out = tmp_path / "counts.csv"

    result = runner.invoke(
        app, ["predict", str(bundle), str(folder), str(single), "--out", str(out), "--cpu"]
    )
    assert result.exit_code == 0, result.output
    with out.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["file", "count", "count_rounded", "chamber", "frame"]
    assert {(r["chamber"], r["frame"]) for r in rows} == {("", "")}  # not microscope export names
    assert [Path(r["file"]).name for r in rows] == ["a.png", "b.tif", "c.png", "single.png"]
    expected, _ = _pytorch_counts(checkpoint, images)
    counts = np.array([float(r["count"]) for r in rows])
    np.testing.assert_allclose(counts, expected, atol=1e-4)
    assert [int(r["count_rounded"]) for r in rows] == round_counts(counts).tolist()

    before = out.read_bytes()
    again = runner.invoke(app, ["predict", str(bundle), str(single), "--out", str(out)])
    assert again.exit_code == 1 and isinstance(again.exception, DataError)
    assert "file exists" in str(again.exception) and out.read_bytes() == before

    (folder / "broken.png").write_bytes(b"not an image")
    bad_out = tmp_path / "x.csv"
    bad = runner.invoke(app, ["predict", str(bundle), str(folder), "--out", str(bad_out)])
    assert bad.exit_code == 1 and isinstance(bad.exception, DataError)
    assert "broken.png" in str(bad.exception) and not bad_out.exists()


def test_predict_skip_bad_leaves_unreadable_images_out(
    bundle: Path, checkpoint: Path, tmp_path: Path
) -> None:
    images = _images(2, seed=4)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, image in zip(["a.png", "c.png"], images, strict=True):
        Image.fromarray(image).save(folder / name)
    (folder / "b.png").write_bytes(b"not an image")
    out = tmp_path / "counts.csv"
    with pytest.warns(SkippedInputWarning) as caught:
        result = runner.invoke(
            app, ["predict", str(bundle), str(folder), "--out", str(out), "--skip-bad", "--cpu"]
        )
    assert result.exit_code == 0, result.output
    assert "2 images, 1 skipped" in result.output
    (message,) = [str(w.message) for w in caught if w.category is SkippedInputWarning]
    assert "skipped 1 bad input(s) of 3 images" in message
    assert message.count("\n  ") == 1 and "b.png" in message  # one entry: the broken file
    with out.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [Path(row["file"]).name for row in rows] == ["a.png", "c.png"]
    expected, _ = _pytorch_counts(checkpoint, images)
    np.testing.assert_allclose([float(row["count"]) for row in rows], expected, atol=1e-4)


@pytest.mark.slow
def test_upstream_bioimageio_cli_passes_offline(bundle: Path) -> None:
    executable = Path(sys.executable).parent / "bioimageio"
    command = str(executable) if executable.exists() else shutil.which("bioimageio")
    assert command, "the bioimageio command line (bioimageio.core) is not installed"
    completed = subprocess.run(
        [command, "test", str(bundle)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": str(Path(sys.executable).parent), "HOME": str(Path.home()), "NO_COLOR": "1"},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    for weight_format in ("pytorch_state_dict", "torchscript", "onnx"):
        assert f"Reproduce test outputs from test inputs ({weight_format})" in " ".join(
            completed.stdout.split()
        )


@pytest.mark.real_data
def test_check_images_come_from_the_real_test_split(cho_k1_root: Path) -> None:
    from twinvae.export.images import load_check_images

    images = load_check_images(cho_k1_root / "pc", "pc", count=8)
    assert not images.generated and len(images) == 8
    assert images.images.shape == (8, 128, 128) and images.images.dtype == np.uint8
    assert (images.counts > 0).all()  # labelled images only, so the bundle's test image has a label
    assert all(name.startswith("test/") for name in images.names)
    distance = np.abs(images.counts - np.median(images.counts))
    assert distance[0] == distance.min()  # the test image has a typical count


def test_validate_command_defaults_to_the_library_tolerance() -> None:
    import inspect

    from twinvae.cli.export import validate_command
    from twinvae.export.checks import DEFAULT_TOLERANCE

    option = inspect.signature(validate_command).parameters["tolerance"].default
    assert option.default == DEFAULT_TOLERANCE
