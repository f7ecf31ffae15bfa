"""The model zoo: manifest, add, list, reproducible build and check (tiny model, tmp zoo)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

import twinvae
from twinvae.cli.main import app
from twinvae.config import ExperimentConfig, TransferConfig
from twinvae.errors import ConfigError
from twinvae.export import ExportOptions, export_bundle
from twinvae.export import bundle as bundle_module
from twinvae.export.formats.base import Runner
from twinvae.model_zoo import ZooManifest, add_entry, check_entry, load_manifest, save_manifest
from twinvae.model_zoo import zoo as zoo_module
from twinvae.model_zoo.manifest import MANIFEST_FORMAT, ZooEntry
from twinvae.models.twin_vae import ModelConfig, TwinVAE
from twinvae.training.checkpoint import Checkpoint, save_checkpoint

TINY = ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,))
runner = CliRunner()
REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ZOO = REPO_ROOT / "model_zoo"
TINY_NAME = "cho-k1-bf-tiny"
OTHER_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
"""Kernels of an AVX2-only CPU on any x86 machine (read when torch starts: subprocess only)."""


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(1)
    config = ExperimentConfig(name="tiny-bf", model=TINY)
    config.data.modality = "bf"
    model = TwinVAE(TINY)
    save_checkpoint(Checkpoint(config=config, model_state=model.state_dict(), epoch=2), path)
    return path


def _entry(**changes: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": "cho-k1-pc-test",
        "modality": "pc",
        "recipe": "quick-cpu",
        "source_checkpoint": "runs/x/best.pt",
        "weights": "weights/cho-k1-pc-test.safetensors",
        "weights_sha256": "0" * 64,
        "config": "weights/cho-k1-pc-test.yaml",
        "config_sha256": "0" * 64,
        "check_images": "weights/cho-k1-pc-test.check-images.npz",
        "check_images_sha256": "0" * 64,
        "epoch": 1,
        "timestamp": "2024-01-01T00:00:00Z",
        "bundle_sha256": "0" * 64,
        "members": {"rdf.yaml": "0" * 64},
        "test_outputs": {"count": [1.5]},
    }
    entry.update(changes)
    return entry


def test_repository_zoo_manifest_is_valid() -> None:
    manifest = load_manifest(REPO_ZOO)
    assert manifest.format == MANIFEST_FORMAT
    assert isinstance(manifest.models, list)
    assert (REPO_ZOO / "README.md").is_file()


@pytest.mark.slow
def test_repository_zoo_models_rebuild_into_valid_bundles() -> None:
    """`twinvae zoo check` on the published models: weights verified, bundles fully validated."""
    from twinvae.model_zoo.zoo import check_zoo

    manifest = load_manifest(REPO_ZOO)
    assert {entry.modality for entry in manifest.models} == {"bf", "pc"}
    for entry in manifest.models:
        assert {"mae", "mre", "accuracy"} <= {key.rsplit(".", 1)[-1] for key in entry.metrics}
    results = check_zoo(REPO_ZOO)
    assert [r.name for r in results] == [e.name for e in manifest.models]
    assert all(r.passed for r in results), [r.detail for r in results if not r.passed]


@pytest.mark.slow
def test_repository_zoo_passes_its_check_on_another_cpu() -> None:
    """The published models rebuilt with an AVX2-only CPU's kernels (one subprocess for all
    entries): the test outputs agree within tolerance and every bundle has the recorded bytes."""
    command = ["-c", "from twinvae.cli.main import main; main()", "zoo", "check"]
    checked = subprocess.run(
        [sys.executable, *command, "--zoo-dir", str(REPO_ZOO)],
        env={**os.environ, **OTHER_CPU, "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for entry in load_manifest(REPO_ZOO).models:
        line = next(x for x in checked.stdout.splitlines() if x.startswith(f"{entry.name} "))
        assert f"{entry.name}  ok" in line and "warning" not in checked.stdout, checked.stdout
        difference, tolerance = _reported_difference(line, "test_output_count.npy")
        assert difference <= tolerance


def _reported_difference(text: str, member: str) -> tuple[float, float]:
    """(max |difference|, tolerance) that a check message reports for a runtime output member."""
    number = r"([0-9.]+(?:e[-+]?[0-9]+)?)"
    found = re.search(
        rf"{re.escape(member)}: max \|difference\| {number} \(tolerance {number}\)", text
    )
    assert found, text
    return float(found.group(1)), float(found.group(2))


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_repository_zoo_names_no_folder_of_the_training_machine() -> None:
    manifest = load_manifest(REPO_ZOO)
    for entry in manifest.models:
        assert not PurePath(entry.source_checkpoint).is_absolute(), entry.source_checkpoint
        config = yaml.safe_load((REPO_ZOO / entry.config).read_text(encoding="utf-8"))
        absolute = [value for value in _strings(config) if PurePath(value).is_absolute()]
        assert absolute == [], f"{entry.config}: {absolute}"


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zoo with one tiny model (read-only: tests that change it work on a copy)."""
    root = tmp_path_factory.mktemp("tiny-zoo")
    zoo = root / "zoo"
    save_manifest(zoo, ZooManifest())
    add_entry(
        zoo, _checkpoint(root / "best.pt"), TINY_NAME, timestamp=datetime(2024, 2, 3, tzinfo=UTC)
    )
    return zoo


def _shifted_outputs(shift: float) -> Callable[[torch.nn.Module], Runner]:
    """The export's PyTorch reference, with every output moved by `shift` (another CPU's
    kernels change the last bits)."""
    original = bundle_module._reference_runner

    def reference(network: torch.nn.Module) -> Runner:
        run = original(network)
        return lambda images: [output + np.float32(shift) for output in run(images)]

    return reference


def test_zoo_bundle_bytes_do_not_depend_on_the_last_bits_of_the_outputs(
    tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs computed a little differently still give the recorded bundle, member by member
    (the test outputs too: the recorded ones are shipped)."""
    entry = load_manifest(tiny_zoo).get(TINY_NAME)
    monkeypatch.setattr(bundle_module, "_reference_runner", _shifted_outputs(2e-6))
    checked = check_entry(tiny_zoo, entry)
    assert checked.passed and checked.warnings == [], checked.detail
    assert f"all {len(entry.members)} members as recorded" in checked.detail
    difference, tolerance = _reported_difference(checked.detail, "test_output_count.npy")
    assert 1e-6 < difference < 3e-6 and difference < tolerance


def test_zoo_check_names_a_changed_member(tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = load_manifest(tiny_zoo).get(TINY_NAME)
    original = bundle_module.documentation
    monkeypatch.setattr(bundle_module, "documentation", lambda ctx: original(ctx) + "edited\n")
    checked = check_entry(tiny_zoo, entry)
    assert not checked.passed
    assert "README.md" in checked.detail and "not reproducible" in checked.detail
    shown = zoo_module.SHOWN_HASH_DIGITS
    assert entry.members["README.md"][:shown] in checked.detail  # the recorded sha256 ...
    assert entry.members["cover.png"][:shown] not in checked.detail  # ... of changed ones only


def test_a_new_config_field_leaves_zoo_bundles_as_recorded(
    tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundle ships the stored config YAML verbatim: a config field added later (which the
    whole config written anew would list) changes no member of a published bundle."""
    entry = load_manifest(tiny_zoo).get(TINY_NAME)
    written = ExperimentConfig.to_yaml
    monkeypatch.setattr(
        ExperimentConfig, "to_yaml", lambda self: written(self) + "new_section: {}\n"
    )
    checked = check_entry(tiny_zoo, entry)
    assert checked.passed, checked.detail
    assert f"all {len(entry.members)} members as recorded" in checked.detail


def test_zoo_check_fails_on_a_test_output_beyond_tolerance(tiny_zoo: Path, tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo)
    manifest = load_manifest(zoo)
    manifest.get(TINY_NAME).test_outputs["count"][0] += 0.5
    save_manifest(zoo, manifest)
    (checked,) = zoo_module.check_zoo(zoo)
    assert not checked.passed
    difference, tolerance = _reported_difference(checked.detail, "test_output_count.npy")
    assert difference == pytest.approx(0.5, abs=1e-6) and tolerance < 0.01
    cli = runner.invoke(app, ["zoo", "check", "--zoo-dir", str(zoo)])
    assert cli.exit_code == 1 and "FAILED" in cli.output


def _bundle_member_bytes(bundle: Path) -> Iterator[tuple[str, bytes]]:
    """Every member of a bundle, and every file inside its zip-based members (.pt files)."""
    with zipfile.ZipFile(bundle) as archive:
        for name in archive.namelist():
            data = archive.read(name)
            yield name, data
            if zipfile.is_zipfile(io.BytesIO(data)):
                with zipfile.ZipFile(io.BytesIO(data)) as inner:
                    for inner_name in inner.namelist():
                        yield f"{name}/{inner_name}", inner.read(inner_name)


def test_exported_bundle_names_no_folder_of_the_exporting_machine(
    tmp_path: Path, make_image_folder: Callable[..., Path]
) -> None:
    runs = tmp_path / "runs"
    config = ExperimentConfig(name="tiny-bf", model=TINY)
    config.data.modality = "bf"
    config.data.natural = str(tmp_path / "cho-k1" / "bf")
    config.transfer = TransferConfig(from_checkpoint=str(runs / "tiny-pc" / "run" / "best.pt"))
    checkpoint = runs / "tiny-bf" / "run" / "best.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.manual_seed(1)
    model_state = TwinVAE(TINY).state_dict()
    save_checkpoint(Checkpoint(config=config, model_state=model_state, epoch=2), checkpoint)
    images = make_image_folder(["a.png", "b.png"], counts={"a.png": 2, "b.png": 3})
    result = export_bundle(checkpoint, tmp_path / "out" / "tiny.zip", ExportOptions(data=images))
    machine_folders = {str(tmp_path), str(tmp_path.resolve()), str(REPO_ROOT)}
    machine_folders.add(str(Path(twinvae.__file__).resolve().parent))
    for name, data in _bundle_member_bytes(result.path):
        for folder in machine_folders:
            assert folder.encode() not in data, f"{name} names {folder}"
    with zipfile.ZipFile(result.path) as archive:
        readme = archive.read("README.md").decode()
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
    assert "tiny-bf/run/best.pt" in readme and "tiny-pc/run/best.pt" in readme
    assert rdf["config"]["twinvae"]["exported_from"].endswith("tiny-bf/run/best.pt")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "cho-k1-test"}, "must say the modality"),
        ({"name": "Cho_K1 pc"}, "lower-case letters"),
        ({"check_images": None, "check_images_sha256": None}, "exactly one of test_data"),
        ({"unknown": 1}, "Extra inputs"),
    ],
)
def test_manifest_rejects_bad_entries(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ZooEntry.model_validate(_entry(**changes))


def test_manifest_rejects_duplicate_names(tmp_path: Path) -> None:
    (tmp_path / "collection.yaml").write_text(
        f"format: {MANIFEST_FORMAT}\nmodels:\n"
        + "".join(
            "- "
            + "\n  ".join(
                f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in _entry().items()
            )
            + "\n"
            for _ in range(2)
        )
    )
    with pytest.raises(ConfigError, match="must be unique"):
        load_manifest(tmp_path)


def test_manifest_of_the_first_format_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "collection.yaml").write_text("format: twinvae-zoo/1\nmodels: []\n")
    with pytest.raises(ConfigError, match=r"twinvae-zoo/1 lacks the test outputs.*zoo add"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("path", "portable"),
    [
        ("/work/runs/cpu-budget/cnn-baseline-bf/run/best.pt", ".../cnn-baseline-bf/run/best.pt"),
        ("/best.pt", ".../best.pt"),
        ("runs/x/best.pt", "runs/x/best.pt"),
        ("../shared/data/cho-k1/bf", "../shared/data/cho-k1/bf"),
    ],
)
def test_portable_path_keeps_no_folder_of_the_machine(path: str, portable: str) -> None:
    assert bundle_module.portable_path(path) == portable


def test_add_refuses_weights_over_the_size_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_manifest(tmp_path, ZooManifest())
    monkeypatch.setattr(zoo_module, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(ConfigError, match="over the"):
        add_entry(tmp_path, _checkpoint(tmp_path / "best.pt"), "cho-k1-bf-big")
    assert load_manifest(tmp_path).models == []
    assert list((tmp_path / "weights").iterdir()) == []


def test_zoo_add_list_build_check(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    save_manifest(zoo, ZooManifest())
    checkpoint = _checkpoint(tmp_path / "best.pt")
    entry = add_entry(
        zoo,
        checkpoint,
        "cho-k1-bf-tiny",
        metrics={"mae": 3.5, "accuracy": 0.125},
        timestamp=datetime(2024, 2, 3, tzinfo=UTC),
    )
    assert entry.modality == "bf" and entry.epoch == 2
    assert str(tmp_path) not in entry.source_checkpoint
    assert entry.source_checkpoint.endswith(f"{tmp_path.name}/best.pt")
    assert {"rdf.yaml", "README.md", "test_output_count.npy"} <= set(entry.members)
    assert len(entry.test_outputs["count"]) == 1
    stored = zoo / entry.weights
    assert stored.suffix == ".safetensors"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == entry.weights_sha256
    assert load_manifest(zoo).get("cho-k1-bf-tiny").bundle_sha256 == entry.bundle_sha256

    listed = runner.invoke(app, ["zoo", "list", "--zoo-dir", str(zoo)])
    assert listed.exit_code == 0, listed.output
    (line,) = listed.output.strip().splitlines()
    assert line.startswith("cho-k1-bf-tiny\tbf\taccuracy=0.125 mae=3.5")

    # add_entry built the bundle once; building again gives the very same bytes
    dist = tmp_path / "dist"
    build = ["zoo", "build", "cho-k1-bf-tiny", "--out", str(dist), "--zoo-dir", str(zoo)]
    built = runner.invoke(app, build)
    assert built.exit_code == 0, built.output
    bundle = dist / "cho-k1-bf-tiny.zip"
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() == entry.bundle_sha256
    again = runner.invoke(app, build)
    assert again.exit_code == 1 and "file exists" in str(again.exception)

    checked = runner.invoke(app, ["zoo", "check", "--zoo-dir", str(zoo)])
    assert checked.exit_code == 0, checked.output
    assert "cho-k1-bf-tiny  ok" in checked.output

    stored.write_bytes(stored.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    broken = runner.invoke(app, ["zoo", "check", "--zoo-dir", str(zoo)])
    assert broken.exit_code == 1
    assert "does not match its sha256" in " ".join(broken.output.split())
