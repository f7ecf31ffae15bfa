"""The model zoo: stored weights (safetensors) that rebuild bioimage.io bundles reproducibly.

Layout of a zoo folder (the repository's `model_zoo/` by default)::

    collection.yaml             the manifest (twinvae.model_zoo.manifest)
    weights/NAME.safetensors    the whole Twin-VAE (`weights_kind: twin-vae`, the bundle's
                                `twinvae_weights.safetensors`), or only its counting path (the
                                first entries); no pickle
    weights/NAME.yaml           the training config

The contract, on every CPU: `zoo build` makes the bundle whose sha256 the manifest records
(`bundle_sha256`, and `members`: the sha256 of every member), as long as the package versions are
the manifest's `built_with`.

- Members that do not depend on floating-point kernels (weights, ONNX and TorchScript files,
  config, docs, code, cover, test inputs) are byte-identical wherever they are built.
- The test outputs are computed by PyTorch on the building machine, and their last bits depend
  on its CPU's kernels. So the manifest records them (`test_outputs`, from the machine that added
  the entry), and every build compares the outputs it computes with the recorded ones within the
  bundle's reproducibility tolerance (rdf.yaml, `twinvae.export.rdf.reproducibility_tolerances`),
  then ships the recorded values. The members that derive from them (sample outputs, rdf.yaml,
  README.md, cover.png) are then CPU-independent too.
- `zoo check` rebuilds every entry and reports, per entry, each runtime output's largest
  difference against its tolerance, and by name every member whose sha256 is not the recorded
  one. A difference beyond tolerance fails; a changed member fails when the package versions
  are those of `built_with`, and is a warning when they changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml

from twinvae.config import config_from_dict
from twinvae.data.modality import settings_modality
from twinvae.errors import CheckpointError, ConfigError, TwinVAEError
from twinvae.export.bundle import (
    ExportOptions,
    ExportResult,
    ExportSource,
    export_source,
    portable_config,
    portable_path,
    resolve_timestamp,
    sha256_file,
    source_from_checkpoint,
)
from twinvae.export.full_weights import (
    counting_state,
    read_full_weights,
    write_full_weights,
)
from twinvae.export.images import (
    CheckImages,
    load_check_images,
    read_check_images,
    save_check_images,
)
from twinvae.export.rdf import BundleMetadata
from twinvae.model_zoo.manifest import (
    MAX_WEIGHTS_BYTES,
    WEIGHTS_DIR,
    ZooEntry,
    ZooManifest,
    load_manifest,
    save_manifest,
)

VERSIONED_PACKAGES = ("twinvae", "torch", "onnx", "onnxscript", "numpy", "matplotlib", "tifffile")


def default_zoo_dir() -> Path:
    """TWINVAE_ZOO_DIR, else the repository's model_zoo/ folder (editable installs)."""
    configured = os.environ.get("TWINVAE_ZOO_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "model_zoo"


def package_versions() -> dict[str, str]:
    """Versions of the packages whose output ends up in the bundle bytes."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def _bundle_metadata(entry: ZooEntry) -> BundleMetadata:
    return BundleMetadata(
        name=entry.name,
        description=entry.description or None,
        authors=tuple(entry.authors),
        version=entry.version,
        license=entry.license,
        timestamp=entry.timestamp,
        extra_metrics=dict(entry.metrics),
        metrics_title="Metrics on the test split (model zoo manifest)",
    )


def _resolve(zoo_dir: Path, relative: str) -> Path:
    path = Path(relative)
    return path if path.is_absolute() else zoo_dir / path


def _verify(entry: ZooEntry, path: Path, expected: str | None) -> None:
    if not path.is_file():
        raise ConfigError(f"{entry.name}: stored file {path} is missing")
    if sha256_file(path) != expected:
        raise ConfigError(
            f"{entry.name}: {path} does not match its sha256 in the manifest (changed?)"
        )


def source_from_entry(zoo_dir: Path, entry: ZooEntry) -> ExportSource:
    """The stored weights and config of an entry, after checking their sha256; the whole
    Twin-VAE (``full_state``) too when the entry stores it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    weights = _resolve(zoo_dir, entry.weights)
    config_path = _resolve(zoo_dir, entry.config)
    _verify(entry, weights, entry.weights_sha256)
    _verify(entry, config_path, entry.config_sha256)
    config_text = config_path.read_text(encoding="utf-8")
    data = yaml.safe_load(config_text)
    config = config_from_dict(data, origin=str(config_path))
    stored = weights.read_bytes()
    full_state = None
    if entry.weights_kind == "twin-vae":
        full_state, model = read_full_weights(stored, str(weights))
        if model != config.model:
            raise CheckpointError(
                f"{weights}: its model sizes differ from those of {config_path}; add the model "
                "again (`twinvae zoo add CHECKPOINT --name NAME --replace`)"
            )
        state = counting_state(full_state, config.model)
    else:
        try:
            state = load(stored)
        except (SafetensorError, ValueError) as error:
            raise CheckpointError(f"{weights}: not a readable safetensors file ({error})") from None
    return ExportSource(
        config=config,
        state=state,
        epoch=entry.epoch,
        metrics={},
        origin=entry.weights,
        full_state=full_state,
        config_text=config_text,
    )


def build_entry(
    zoo_dir: Path, name: str, out_dir: Path, *, overwrite: bool = False
) -> ExportResult:
    """Rebuild NAME's bundle from the stored weights into out_dir/NAME.zip (validated)."""
    entry = load_manifest(zoo_dir).get(name)
    return _build(zoo_dir, entry, out_dir / f"{name}.zip", overwrite=overwrite)


def _stored_images(zoo_dir: Path, entry: ZooEntry) -> CheckImages | None:
    if entry.check_images is None:
        return None
    path = _resolve(zoo_dir, entry.check_images)
    _verify(entry, path, entry.check_images_sha256)
    return read_check_images(path)


def _recorded_outputs(entry: ZooEntry) -> dict[str, np.ndarray]:
    return {key: np.asarray(values, dtype=np.float32) for key, values in entry.test_outputs.items()}


def _build(
    zoo_dir: Path, entry: ZooEntry, out: Path, *, overwrite: bool, recorded: bool = True
) -> ExportResult:
    """Export the entry's bundle; with `recorded` (always, except when the entry is added) it
    ships the recorded test outputs."""
    source = source_from_entry(zoo_dir, entry)
    options = ExportOptions(
        with_mu=entry.with_mu,
        data=_resolve(zoo_dir, entry.test_data) if entry.test_data else None,
        images=_stored_images(zoo_dir, entry),
        overwrite=overwrite,
        metadata=_bundle_metadata(entry),
        recorded_outputs=_recorded_outputs(entry) if recorded else None,
    )
    return export_source(source, out, options)


def member_hashes(bundle: Path) -> dict[str, str]:
    """sha256 of every member of a bundle zip, in the zip's order."""
    with zipfile.ZipFile(bundle) as archive:
        return {name: hashlib.sha256(archive.read(name)).hexdigest() for name in archive.namelist()}


def _build_and_hash(
    zoo_dir: Path, entry: ZooEntry, *, recorded: bool = True
) -> tuple[ExportResult, dict[str, str]]:
    """Build the entry's bundle in a scratch folder: the result and its members' sha256."""
    with tempfile.TemporaryDirectory(prefix="twinvae-zoo-") as scratch:
        out = Path(scratch) / f"{entry.name}.zip"
        result = _build(zoo_dir, entry, out, overwrite=False, recorded=recorded)
        return result, member_hashes(result.path)


def _record_build(entry: ZooEntry, result: ExportResult, members: dict[str, str]) -> None:
    # float32 -> float is exact and YAML writes floats so that they read back to the same bits
    entry.test_outputs = {
        key: [float(value) for value in values.reshape(-1)]
        for key, values in result.test_outputs.items()
    }
    entry.members = members
    entry.bundle_sha256 = result.sha256
    entry.built_with = package_versions()


def _stored_bytes(zoo_dir: Path, manifest: ZooManifest) -> int:
    return sum(
        _resolve(zoo_dir, path).stat().st_size
        for entry in manifest.models
        for path in (entry.weights, entry.config, entry.check_images)
        if path is not None and _resolve(zoo_dir, path).is_file()
    )


def add_entry(
    zoo_dir: Path,
    checkpoint: Path,
    name: str,
    *,
    recipe: str | None = None,
    description: str = "",
    metrics: dict[str, float] | None = None,
    authors: tuple[str, ...] = ("twinvae contributors",),
    version: str = "0.1.0",
    license_id: str = "MIT",
    with_mu: bool = False,
    test_data: str | None = None,
    timestamp: datetime | None = None,
    replace: bool = False,
) -> ZooEntry:
    """Publish a checkpoint: store the whole Twin-VAE as safetensors (`write_full_weights`),
    build and validate the bundle, and record the entry (with the bundle's sha256) in the
    manifest."""
    manifest = load_manifest(zoo_dir) if (zoo_dir / "collection.yaml").is_file() else ZooManifest()
    existing = [entry for entry in manifest.models if entry.name == name]
    if existing and not replace:
        raise ConfigError(f"the zoo already has a model {name!r}; pass --replace to update it")
    source = source_from_checkpoint(checkpoint)
    modality = source.config.data.modality
    look = settings_modality(modality, source.config.data.synthetic_generator)
    weights_dir = zoo_dir / WEIGHTS_DIR
    weights_dir.mkdir(parents=True, exist_ok=True)
    weights = weights_dir / f"{name}.safetensors"
    config_path = weights_dir / f"{name}.yaml"
    images_path = weights_dir / f"{name}.check-images.npz"
    written: list[Path] = []
    try:
        if test_data is None:
            # Stored, so that rebuilding does not depend on the generator's current version.
            save_check_images(images_path, load_check_images(None, modality, look=look))
            written.append(images_path)
        assert source.full_state is not None  # a checkpoint holds the whole model
        write_full_weights(weights, source.full_state, source.config.model)
        written.append(weights)
        portable_config(source.config).save(config_path)
        written.append(config_path)
        entry = ZooEntry(
            name=name,
            modality=modality,
            description=description,
            recipe=recipe or f"config {source.config.name!r} (attached to the bundle)",
            source_checkpoint=portable_path(checkpoint),
            weights=f"{WEIGHTS_DIR}/{weights.name}",
            weights_sha256=sha256_file(weights),
            weights_kind="twin-vae",
            config=f"{WEIGHTS_DIR}/{config_path.name}",
            config_sha256=sha256_file(config_path),
            epoch=source.epoch,
            metrics=dict(metrics or {}),
            with_mu=with_mu,
            test_data=test_data,
            check_images=f"{WEIGHTS_DIR}/{images_path.name}" if test_data is None else None,
            check_images_sha256=sha256_file(images_path) if test_data is None else None,
            authors=list(authors),
            license=license_id,
            version=version,
            timestamp=resolve_timestamp(timestamp),
            # placeholders until the first build: it computes and records them
            test_outputs={"count": [0.0]},
            members={"rdf.yaml": "0" * 64},
            bundle_sha256="0" * 64,
        )
        others = [e for e in manifest.models if e.name != name]
        candidate = ZooManifest(models=[*others, entry])
        size = _stored_bytes(zoo_dir, candidate)
        if size > MAX_WEIGHTS_BYTES:
            raise ConfigError(
                f"stored weights would total {size / 2**20:.1f} MiB, over the "
                f"{MAX_WEIGHTS_BYTES / 2**20:.0f} MiB the zoo may commit"
            )
        _record_build(entry, *_build_and_hash(zoo_dir, entry, recorded=False))
        save_manifest(zoo_dir, ZooManifest(models=[*others, entry]))
    except BaseException:
        if not existing:
            for path in written:
                path.unlink(missing_ok=True)
        raise
    return entry


@dataclass
class EntryCheck:
    """The outcome of checking one zoo entry."""

    name: str
    passed: bool
    detail: str
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _changed_packages(entry: ZooEntry) -> dict[str, tuple[str | None, str]]:
    return {
        package: (entry.built_with.get(package), version)
        for package, version in package_versions().items()
        if entry.built_with.get(package) != version
    }


SHOWN_HASH_DIGITS = 16
"""Leading hex digits of a member's sha256 in check messages (enough to tell them apart)."""


def _member_differences(recorded: dict[str, str], built: dict[str, str]) -> list[str]:
    """'NAME (sha256 BUILT..., the manifest records RECORDED...)' for every member that differs."""
    differences = []
    for name in sorted(recorded.keys() | built.keys()):
        new, old = built.get(name), recorded.get(name)
        if new == old:
            continue
        if new is None:
            differences.append(f"{name} (missing from the rebuilt bundle)")
        elif old is None:
            differences.append(f"{name} (not in the manifest)")
        else:
            differences.append(
                f"{name} (sha256 {new[:SHOWN_HASH_DIGITS]}..., the manifest records "
                f"{old[:SHOWN_HASH_DIGITS]}...)"
            )
    return differences


def check_entry(zoo_dir: Path, entry: ZooEntry) -> EntryCheck:
    """Stored files match, the rebuilt bundle validates, its test outputs agree with the
    recorded ones within tolerance, and its members and hash are the recorded ones (changed
    members are a warning when package versions differ from `built_with`)."""
    start = time.perf_counter()
    try:
        result, members = _build_and_hash(zoo_dir, entry)
    except TwinVAEError as error:
        return EntryCheck(entry.name, False, str(error), seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    outputs = "; ".join(c.describe() for c in result.output_comparisons)
    warnings: list[str] = []
    differences = _member_differences(entry.members, members)
    if differences or result.sha256 != entry.bundle_sha256:
        what = (
            ", ".join(differences)
            if differences
            else f"its zip bytes (sha256 {result.sha256}, the manifest records "
            f"{entry.bundle_sha256}; every member is the recorded one)"
        )
        changed = _changed_packages(entry)
        if not changed:
            return EntryCheck(
                entry.name,
                False,
                f"rebuilt bundle differs from the manifest in {what} with the same package "
                f"versions (not reproducible); {outputs}",
                seconds=seconds,
            )
        warnings.append(
            f"rebuilt bundle differs from the manifest in {what}; package versions changed: "
            + ", ".join(f"{p} {old} -> {new}" for p, (old, new) in sorted(changed.items()))
        )
    same = "" if warnings else f", all {len(members)} members as recorded"
    return EntryCheck(
        entry.name,
        True,
        f"weights verified, bundle valid ({len(result.report.checks)} checks){same}; {outputs}",
        warnings=warnings,
        seconds=seconds,
    )


def record_entry(zoo_dir: Path, name: str) -> ZooEntry:
    """Rebuild NAME and record the bundle it gives now (member sha256, bundle sha256, package
    versions) in the manifest, after an intended change of the bundle (a new twinvae, torch or
    onnx version). The recorded test outputs stay: a rebuild that does not reproduce them within
    tolerance fails, and a model whose outputs changed must be added again."""
    manifest = load_manifest(zoo_dir)
    entry = manifest.get(name)
    _record_build(entry, *_build_and_hash(zoo_dir, entry))
    save_manifest(zoo_dir, manifest)
    return entry


def check_zoo(zoo_dir: Path) -> list[EntryCheck]:
    """Check every entry of the zoo (stored weights over the size limit fail the first one)."""
    manifest = load_manifest(zoo_dir)
    results = [check_entry(zoo_dir, entry) for entry in manifest.models]
    size = _stored_bytes(zoo_dir, manifest)
    if size > MAX_WEIGHTS_BYTES:
        results.append(
            EntryCheck(
                "(size)",
                False,
                f"stored weights total {size / 2**20:.1f} MiB, limit "
                f"{MAX_WEIGHTS_BYTES / 2**20:.0f} MiB",
            )
        )
    return results
