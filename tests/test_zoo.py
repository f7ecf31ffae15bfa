"""The model zoo: manifest, add, list, reproducible build and check (tiny model, tmp zoo)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from twinvae.cli.main import app
from twinvae.config import ExperimentConfig
from twinvae.errors import ConfigError
from twinvae.model_zoo import ZooManifest, add_entry, load_manifest, save_manifest
from twinvae.model_zoo import zoo as zoo_module
from twinvae.model_zoo.manifest import ZooEntry
from twinvae.models.twin_vae import ModelConfig, TwinVAE
from twinvae.training.checkpoint import Checkpoint, save_checkpoint

TINY = ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,))
runner = CliRunner()
REPO_ZOO = Path(__file__).resolve().parents[1] / "model_zoo"


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
    }
    entry.update(changes)
    return entry


def test_repository_zoo_manifest_is_valid() -> None:
    manifest = load_manifest(REPO_ZOO)
    assert manifest.format == "twinvae-zoo/1"
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
        "format: twinvae-zoo/1\nmodels:\n"
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
