"""The model zoo's collection manifest (model_zoo/collection.yaml)."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twinvae.errors import ConfigError
from twinvae.fileio import atomic_writer

MANIFEST_FILE = "collection.yaml"
MANIFEST_FORMAT: Literal["twinvae-zoo/2"] = "twinvae-zoo/2"
"""Format 2 records the test outputs and the sha256 of every bundle member (see zoo.py)."""
WEIGHTS_DIR = "weights"
MAX_WEIGHTS_BYTES = 50 * 1024 * 1024
"""Stored weights committed to the repository, all entries together."""

WeightsKind = Literal["twin-vae", "counting-path"]

_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

_HEADER = """\
# twinvae model zoo: published Twin-VAE cell-counting models (see README.md).
# Edit with `twinvae zoo add`; rebuild bundles with `twinvae zoo build NAME`.
"""


class ZooEntry(BaseModel):
    """One published model: stored weights, how they were trained, and what they achieve."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="e.g. cho-k1-pc-paper; says the modality (bf, pc, ...)")
    modality: str = Field(
        pattern=r"^[a-z][a-z0-9]*$",
        description="bf, pc, or the name of another modality (data.modality of the run)",
    )
    description: str = ""
    recipe: str = Field(description="training recipe: config name and notable settings")
    source_checkpoint: str = Field(
        description="the checkpoint the weights were taken from, without the training machine's "
        "folders: relative as given, or `.../` and the last parts of an absolute path"
    )
    weights: str = Field(description="safetensors weights file, relative to the zoo")
    weights_sha256: str
    weights_kind: WeightsKind = Field(
        "counting-path",
        description="what the weights file holds: the whole Twin-VAE (both encoders, both "
        "decoders, shared layers, regressor; what fine-tuning with the synthetic twin starts "
        "from), or only the counting path (natural encoder, shared encoder, regressor; the "
        "first entries, whose source checkpoints are gone)",
    )
    config: str = Field(description="training config YAML, relative to the zoo")
    config_sha256: str
    epoch: int = Field(ge=0)
    metrics: dict[str, float] = Field(
        default_factory=dict, description="metrics on the test split (e.g. mae, accuracy)"
    )
    with_mu: bool = False
    test_data: str | None = Field(
        None, description="real images the bundle is tested on (relative to the zoo folder)"
    )
    check_images: str | None = Field(
        None, description="stored generated test images (.npz), used when test_data is None"
    )
    check_images_sha256: str | None = None
    authors: list[str] = Field(default_factory=lambda: ["twinvae contributors"])
    license: str = "MIT"
    version: str = "0.1.0"
    timestamp: datetime = Field(description="creation time written into the bundle")
    test_outputs: dict[str, list[float]] = Field(
        description="the bundle's test outputs by output id (flat float32 values), recorded when "
        "the entry was added; every build ships them after checking that the outputs computed "
        "there agree within the bundle's tolerance"
    )
    members: dict[str, str] = Field(
        description="sha256 of every member of the bundle zip `zoo build` makes"
    )
    bundle_sha256: str = Field(description="sha256 of the bundle zip `zoo build` makes")
    built_with: dict[str, str] = Field(
        default_factory=dict, description="package versions the bundle_sha256 was made with"
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value) or len(value) > 64:
            raise ValueError(
                f"{value!r}: use lower-case letters, digits and single dashes, e.g. cho-k1-pc-paper"
            )
        return value

    @field_validator("test_outputs")
    @classmethod
    def _check_outputs(cls, value: dict[str, list[float]]) -> dict[str, list[float]]:
        if "count" not in value or any(not values for values in value.values()):
            raise ValueError("needs the recorded values of every output, at least 'count'")
        return value

    @field_validator("members")
    @classmethod
    def _check_members(cls, value: dict[str, str]) -> dict[str, str]:
        if "rdf.yaml" not in value:
            raise ValueError("needs the sha256 of every bundle member, rdf.yaml included")
        bad = sorted(name for name, digest in value.items() if not _SHA256.match(digest))
        if bad:
            raise ValueError(f"not a sha256 (64 lower-case hex digits): {', '.join(bad)}")
        return value

    @model_validator(mode="after")
    def _one_image_source(self) -> ZooEntry:
        if (self.test_data is None) == (self.check_images is None):
            raise ValueError("give exactly one of test_data (real images) and check_images")
        if self.check_images is not None and self.check_images_sha256 is None:
            raise ValueError("check_images needs check_images_sha256")
        return self

    @model_validator(mode="after")
    def _name_says_modality(self) -> ZooEntry:
        if self.modality not in self.name.split("-"):
            raise ValueError(
                f"name {self.name!r} must say the modality, e.g. cho-k1-{self.modality}-..."
            )
        return self


class ZooManifest(BaseModel):
    """The collection: a format marker and a list of entries with unique names."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["twinvae-zoo/2"] = MANIFEST_FORMAT
    models: list[ZooEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> ZooManifest:
        names = [entry.name for entry in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {duplicates}")
        return self

    def get(self, name: str) -> ZooEntry:
        for entry in self.models:
            if entry.name == name:
                return entry
        known = ", ".join(entry.name for entry in self.models) or "none"
        raise ConfigError(f"no model {name!r} in the zoo (models: {known})")


def load_manifest(zoo_dir: Path) -> ZooManifest:
    """Read and validate collection.yaml; a zoo folder without one is an error."""
    path = zoo_dir / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: zoo manifest not found (is {zoo_dir} a model zoo folder?)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if isinstance(data, dict) and data.get("format") == "twinvae-zoo/1":
        raise ConfigError(
            f"{path}: zoo manifest format twinvae-zoo/1 lacks the test outputs and member hashes "
            f"of {MANIFEST_FORMAT}; add its models again (`twinvae zoo add CHECKPOINT --name NAME "
            "--replace`)"
        )
    try:
        return ZooManifest.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"{path}: invalid zoo manifest: {problems}") from None


def save_manifest(zoo_dir: Path, manifest: ZooManifest) -> None:
    """Write collection.yaml atomically (header comment, then the entries)."""
    body = yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False, width=100)
    with atomic_writer(zoo_dir / MANIFEST_FILE) as stream:
        stream.write(_HEADER + body)
