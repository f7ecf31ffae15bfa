"""Fine-tuning from what users download: bundles and zoo entries carry the whole Twin-VAE, and
`twinvae transfer --from` takes a zoo name, a bundle, a run folder or a checkpoint (tiny models)."""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from _fine_tune_data import TINY, write_labelled_folder
from twinvae.cli.main import app
from twinvae.config import ExperimentConfig, config_from_dict
from twinvae.errors import CheckpointError, ConfigError, TwinVAEWarning
from twinvae.export import export_bundle, validate_bundle
from twinvae.export.full_weights import (
    FULL_WEIGHTS_FILE,
    full_weights_bytes,
    is_counting_key,
    read_full_weights,
)
from twinvae.model_zoo import ZooManifest, add_entry, build_entry, load_manifest, save_manifest
from twinvae.models.twin_vae import TwinVAE
from twinvae.runtime import twinvae_bundle
from twinvae.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from twinvae.training.sources import resolve_transfer_source

TIMESTAMP = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
runner = CliRunner()
QUICK = [
    "--set", "train.epochs=1", "--set", "train.steps_per_epoch=1", "--set", "train.batch_size=4",
    "--set", "train.num_threads=1", "--no-progress",
]  # fmt: skip


def _source_checkpoint(path: Path, modality: str = "pc") -> Path:
    """A tiny Twin-VAE whose decoders and synthetic encoder differ from a fresh one."""
    torch.manual_seed(5)
    model = TwinVAE(TINY)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    config = ExperimentConfig(name=f"tiny-{modality}", model=TINY)
    config.data.modality = modality
    save_checkpoint(Checkpoint(config=config, model_state=model.state_dict(), epoch=4), path)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _source_checkpoint(tmp_path_factory.mktemp("source") / "best.pt")


@pytest.fixture(scope="module")
def bundle(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(source, tmp_path_factory.mktemp("bundle") / "tiny.zip").path


def _without_full_weights(bundle: Path, target: Path) -> Path:
    """The bundle as exported before bundles attached the whole Twin-VAE."""
    with zipfile.ZipFile(bundle) as archive, zipfile.ZipFile(target, "w") as out:
        for name in archive.namelist():
            if name == FULL_WEIGHTS_FILE:
                continue
            data = archive.read(name)
            if name == "rdf.yaml":
                rdf = yaml.safe_load(data)
                rdf["attachments"] = [
                    a for a in rdf["attachments"] if a["source"] != FULL_WEIGHTS_FILE
                ]
                data = yaml.safe_dump(rdf, sort_keys=False).encode()
            out.writestr(name, data)
    return target


@pytest.fixture(scope="module")
def old_bundle(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _without_full_weights(bundle, tmp_path_factory.mktemp("old") / "old.zip")


@pytest.fixture
def new_images(tmp_path: Path) -> Path:
    return write_labelled_folder(tmp_path / "new")


@pytest.fixture(scope="module")
def tiny_zoo(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    zoo = tmp_path_factory.mktemp("zoo") / "zoo"
    save_manifest(zoo, ZooManifest())
    add_entry(zoo, source, "cho-k1-pc-tiny", timestamp=TIMESTAMP)
    yield zoo


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model_state


def _assert_whole_twin(loaded: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    """Every tensor of the source: the counting path exactly, the rest to float16 rounding."""
    assert loaded.keys() == source.keys()
    for key, value in source.items():
        if is_counting_key(key, TINY) or not value.is_floating_point():
            assert torch.equal(loaded[key], value), key
        else:
            assert torch.allclose(loaded[key], value, rtol=1e-3, atol=1e-4), key


# --- what bundles and zoo entries hold ---------------------------------------------------------


def test_bundle_attaches_the_whole_twin_vae(bundle: Path, source: Path) -> None:
    with zipfile.ZipFile(bundle) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        stored = archive.read(FULL_WEIGHTS_FILE)
        readme = archive.read("README.md").decode()
    assert FULL_WEIGHTS_FILE in [entry["source"] for entry in rdf["attachments"]]
    assert twinvae_bundle.has_full_weights(twinvae_bundle.read_bundle_info(bundle))
    state, model = read_full_weights(stored, FULL_WEIGHTS_FILE)
    assert model == TINY
    _assert_whole_twin(state, _state(source))
    assert "## Fine-tuning" in readme and f"twinvae transfer --from {bundle.name}" in readme
    # the stale texts: validate needs --trust-code for both checks; predict writes chamber, frame
    assert "--trust-code` to repeat both" in readme
    assert "`file,count,count_rounded,chamber,frame`" in readme


def test_full_weights_store_the_rest_as_float16() -> None:
    twin = TwinVAE(TINY)
    data = full_weights_bytes(twin.state_dict(), TINY)
    from safetensors.torch import load

    raw = load(data)
    assert raw["encoders.natural.0.weight"].dtype == torch.float32
    assert raw["decoders.synthetic.0.weight"].dtype == torch.float16
    assert raw["decoders.natural.1.running_var"].dtype == torch.float32
    assert full_weights_bytes(read_full_weights(data, "x")[0], TINY) == data  # same bytes again
    # zoo bundles are rebuilt byte for byte: safetensors' own writer orders the metadata by a
    # randomly seeded hash map, so the same state did not always give the same bytes
    assert {full_weights_bytes(twin.state_dict(), TINY) for _ in range(8)} == {data}


def test_validate_checks_the_attached_weights(
    bundle: Path, old_bundle: Path, tmp_path: Path
) -> None:
    report = validate_bundle(bundle, core_tests=False)
    (check,) = [c for c in report.checks if c.name == "full weights"]
    assert check.passed and not check.skipped and "reproduces the test output" in check.detail
    old = validate_bundle(old_bundle, core_tests=False)
    (check,) = [c for c in old.checks if c.name == "full weights"]
    assert old.passed and check.skipped and "only the counting path" in check.detail
    # an attachment whose counting path is not the bundle's network fails the check
    state, model = read_full_weights(
        zipfile.ZipFile(bundle).read(FULL_WEIGHTS_FILE), FULL_WEIGHTS_FILE
    )
    state["regressor.0.bias"] = state["regressor.0.bias"] + 1.0
    tampered = _replace_member(
        bundle, tmp_path / "tampered.zip", FULL_WEIGHTS_FILE, full_weights_bytes(state, model)
    )
    broken = validate_bundle(tampered, core_tests=False)
    (check,) = [c for c in broken.checks if c.name == "full weights"]
    assert not check.passed and "away from the stored test output" in check.detail


def _replace_member(bundle: Path, target: Path, member: str, data: bytes) -> Path:
    """The bundle with one member replaced and its sha256 in rdf.yaml updated to match."""
    with zipfile.ZipFile(bundle) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    old, new = (hashlib.sha256(blob).hexdigest() for blob in (members[member], data))
    members[member] = data
    members["rdf.yaml"] = members["rdf.yaml"].replace(old.encode(), new.encode())
    with zipfile.ZipFile(target, "w") as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    return target


def test_zoo_entry_stores_the_whole_twin_vae(tiny_zoo: Path, source: Path, tmp_path: Path) -> None:
    entry = load_manifest(tiny_zoo).get("cho-k1-pc-tiny")
    assert entry.weights_kind == "twin-vae"
    state, _ = read_full_weights((tiny_zoo / entry.weights).read_bytes(), entry.weights)
    _assert_whole_twin(state, _state(source))
    built = build_entry(tiny_zoo, "cho-k1-pc-tiny", tmp_path)
    with zipfile.ZipFile(built.path) as archive:
        assert archive.read(FULL_WEIGHTS_FILE) == (tiny_zoo / entry.weights).read_bytes()
    listed = runner.invoke(app, ["zoo", "list", "--zoo-dir", str(tiny_zoo)])
    assert listed.exit_code == 0 and listed.output.rstrip().endswith("whole Twin-VAE")


def test_repository_zoo_entries_stay_counting_path_only() -> None:
    """The published entries' source checkpoints are gone: they keep their counting path."""
    from twinvae.model_zoo.zoo import default_zoo_dir

    listed = runner.invoke(app, ["zoo", "list", "--zoo-dir", str(default_zoo_dir())])
    assert listed.exit_code == 0
    for entry in load_manifest(default_zoo_dir()).models:
        assert entry.weights_kind == "counting-path"
        assert f"{entry.name}\t" in listed.output
    assert listed.output.count("counting path only") == len(load_manifest(default_zoo_dir()).models)


# --- transfer --from ---------------------------------------------------------------------------


def _transfer(args: list[str], out: Path) -> Checkpoint:
    result = runner.invoke(app, ["transfer", *args, "--out", str(out), *QUICK])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return load_checkpoint(out / "last.pt")


def test_transfer_from_a_bundle_a_zoo_name_and_a_run(
    bundle: Path,
    source: Path,
    tiny_zoo: Path,
    new_images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """frozen-outer keeps both encoders and both decoders as loaded: they are the source's."""
    monkeypatch.setenv("TWINVAE_ZOO_DIR", str(tiny_zoo))
    expected = _state(source)
    common = ["--strategy", "frozen-outer", "--set", f"data.natural={new_images}"]
    outer = [k for k in expected if k.startswith(("encoders.", "decoders.")) and "num_" not in k]
    for name, spec in (
        ("bundle", str(bundle)),
        ("zoo", "cho-k1-pc-tiny"),
        ("run", str(source.parent)),
        ("checkpoint", str(source)),
    ):
        trained = _transfer(["--from", spec, *common], tmp_path / name)
        assert trained.config.model == TINY
        recorded = trained.config.transfer.from_checkpoint  # type: ignore[union-attr]
        assert recorded == ("zoo:cho-k1-pc-tiny" if name == "zoo" else spec)
        for key in outer:
            exact = name in ("run", "checkpoint") or is_counting_key(key, TINY)
            if exact:
                assert torch.equal(trained.model_state[key], expected[key]), (name, key)
            else:
                assert torch.allclose(
                    trained.model_state[key], expected[key], rtol=1e-3, atol=1e-4
                ), (name, key)


def test_a_counting_path_only_source_allows_natural_only_runs(
    old_bundle: Path, source: Path, new_images: Path, tmp_path: Path
) -> None:
    base = ["--from", str(old_bundle), "--set", f"data.natural={new_images}"]
    refused = runner.invoke(app, ["transfer", *base, "--out", str(tmp_path / "a"), *QUICK])
    assert refused.exit_code == 1
    message = " ".join(str(refused.exception).split())
    assert "holds only the counting path" in message
    assert "no synthetic encoder and no decoders" in message
    assert "--natural-only" in message
    assert not (tmp_path / "a").exists()  # refused before any run folder was made
    frozen = runner.invoke(
        app,
        [
            "transfer",
            *base,
            "--natural-only",
            "--strategy",
            "frozen-outer",
            "--out",
            str(tmp_path / "b"),
            *QUICK,
        ],
    )
    assert frozen.exit_code == 1 and "would freeze the natural decoder" in str(frozen.exception)
    with pytest.warns(TwinVAEWarning, match="decoders and the synthetic encoder start freshly"):
        trained = _transfer(
            [*base, "--natural-only", "--no-decoder", "--strategy", "frozen-outer"],
            tmp_path / "c",
        )
    expected = _state(source)
    natural = [k for k in expected if k.startswith("encoders.natural.")]
    assert natural and all(torch.equal(trained.model_state[k], expected[k]) for k in natural)
    fresh = "decoders.natural.0.weight"
    assert not torch.allclose(trained.model_state[fresh], expected[fresh])


def test_sources_that_are_not_transfer_sources_say_what_to_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_zoo: Path
) -> None:
    monkeypatch.setenv("TWINVAE_ZOO_DIR", str(tiny_zoo))
    with pytest.raises(CheckpointError, match=r"model zoo folder.*models: cho-k1-pc-tiny"):
        resolve_transfer_source(tiny_zoo / "weights")
    with pytest.raises(CheckpointError, match=r"no model of that name in the zoo.*cho-k1-pc-tiny"):
        resolve_transfer_source("cho-k1-pc-other")
    zoo_file = resolve_transfer_source(tiny_zoo / "weights" / "cho-k1-pc-tiny.safetensors")
    assert zoo_file.kind == "zoo" and zoo_file.complete and zoo_file.spec == "zoo:cho-k1-pc-tiny"
    counting = tmp_path / "counting.safetensors"
    from safetensors.torch import save_file

    save_file(
        {"encoder.0.weight": torch.zeros(1)},
        str(counting),
        {"format": "twinvae-counting-network/1"},
    )
    with pytest.raises(CheckpointError, match=r"only the counting path.*zoo model's name"):
        resolve_transfer_source(counting)


def test_counting_path_zoo_entries_load_into_the_natural_path(tmp_path: Path) -> None:
    """The two published entries (counting path only) start natural-only runs."""
    from twinvae.model_zoo.zoo import default_zoo_dir

    for entry in load_manifest(default_zoo_dir()).models:
        loaded = resolve_transfer_source(entry.name)
        assert not loaded.complete and loaded.lacks is not None
        model = TwinVAE(loaded.model)
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        loaded.load_into(model)
        state = model.state_dict()
        for key, value in loaded.state.items():
            assert torch.equal(state[key], value)
        assert torch.equal(state["decoders.natural.0.weight"], fresh["decoders.natural.0.weight"])
        with pytest.raises(ConfigError, match="--natural-only"):
            from twinvae.training.sources import check_transfer_plan

            check_transfer_plan(loaded, ExperimentConfig(model=loaded.model))


# --- other modalities --------------------------------------------------------------------------


@pytest.mark.parametrize(("look", "expected"), [("bf", "bf"), ("pc", "pc")])
def test_another_modality_takes_the_closest_generator_settings(
    tmp_path: Path, look: str, expected: str
) -> None:
    from twinvae.config import DataConfig
    from twinvae.training.data import prepare_data, synth_config

    folder = write_labelled_folder(tmp_path / "dic", modality=look, labelled=20)
    data = DataConfig(natural=str(folder), modality="DIC")
    assert data.modality == "dic"
    with pytest.warns(TwinVAEWarning, match=rf"{expected.upper()} settings, because .*mean grey"):
        prepared = prepare_data(data, seed=0)
    chosen = prepared.data_config
    assert chosen is not None and chosen.synthetic_generator == {"modality": expected}
    assert synth_config(chosen).modality == expected
    given = data.model_copy(update={"synthetic_generator": {"modality": "bf", "blur_blend": 0.3}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", TwinVAEWarning)
        assert prepare_data(given, seed=0).data_config is None  # the user's choice stands
    assert synth_config(given).modality == "bf" and synth_config(given).blur_blend == 0.3


def test_another_modality_without_images_needs_the_choice() -> None:
    from twinvae.config import DataConfig
    from twinvae.training.data import prepare_data

    with pytest.raises(ConfigError, match=r"'other'.*data.synthetic_generator.modality=bf"):
        prepare_data(DataConfig(natural=None, modality="other"), seed=0)
    with pytest.raises(ConfigError, match=r"data\.modality: String should match pattern"):
        config_from_dict({"data": {"modality": "d i c"}})


def test_fine_tune_for_another_modality_records_its_choice(
    bundle: Path, new_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["--from", str(bundle), "--set", f"data.natural={new_images}", "--set"]
    trained = _transfer([*args, "data.modality=fluorescence"], out)
    assert trained.config.data.modality == "fluorescence"
    assert trained.config.data.synthetic_generator == {"modality": "pc"}
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["synthetic_generator"] == {"modality": "pc"}
    with zipfile.ZipFile(
        export_bundle(out / "best.pt", tmp_path / "fluorescence.zip").path
    ) as archive:
        readme = archive.read("README.md").decode()
        config = yaml.safe_load(archive.read("config.yaml"))
    assert "Modality: fluorescence (FLUORESCENCE)" in readme and "with its PC settings" in readme
    assert config["data"]["synthetic_generator"] == {"modality": "pc"}


# --- the published models on real images ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_data
def test_fine_tune_both_published_models_on_ten_real_labels(
    cho_k1_root: Path, tmp_path: Path
) -> None:
    """The zoo models (counting path only) fine-tuned natural-only on a generic folder of real
    images with 10 labels: one from its zoo name, one from its zoo-built bundle; each exported
    bundle passes validate (1 epoch, 2 steps)."""
    from twinvae.data.readers import read_cho_k1
    from twinvae.model_zoo.zoo import default_zoo_dir

    for entry in load_manifest(default_zoo_dir()).models:
        images = read_cho_k1(cho_k1_root, entry.modality, "train")  # type: ignore[arg-type]
        labelled = np.flatnonzero(images.labelled)[::7][:10]
        unlabelled = np.flatnonzero(~images.labelled)[::50][:30]
        folder = tmp_path / f"new-{entry.modality}"
        folder.mkdir()
        rows = ["filename,count"]
        for index in [*labelled, *unlabelled]:
            name = Path(images.names[index]).with_suffix(".png").name
            Image.fromarray(images.images[index]).save(folder / name)
            rows.append(f"{name},{int(images.counts[index])}")
        (folder / "counts.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        start = entry.name
        if entry.modality == "bf":
            start = str(build_entry(default_zoo_dir(), entry.name, tmp_path).path)
        run = tmp_path / f"run-{entry.modality}"
        _transfer(
            [
                "--from",
                start,
                "--natural-only",
                "--set",
                f"data.natural={folder}",
                "--set",
                "data.modality=other",
            ],
            run,
        )
        out = tmp_path / f"fine-tuned-{entry.modality}.zip"
        exported = runner.invoke(app, ["export", str(run / "best.pt"), "--out", str(out)])
        assert exported.exit_code == 0, exported.output
        validated = runner.invoke(app, ["validate", str(out), "--no-progress"])
        assert validated.exit_code == 0, validated.output
        assert twinvae_bundle.has_full_weights(twinvae_bundle.read_bundle_info(out))
