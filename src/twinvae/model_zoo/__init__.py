"""The model zoo: a manifest of published models whose bundles are rebuilt from stored weights."""

from __future__ import annotations

from twinvae.model_zoo.manifest import ZooEntry, ZooManifest, load_manifest, save_manifest
from twinvae.model_zoo.zoo import (
    EntryCheck,
    add_entry,
    build_entry,
    check_entry,
    check_zoo,
    default_zoo_dir,
    record_entry,
)

__all__ = [
    "EntryCheck",
    "ZooEntry",
    "ZooManifest",
    "add_entry",
    "build_entry",
    "check_entry",
    "check_zoo",
    "default_zoo_dir",
    "load_manifest",
    "record_entry",
    "save_manifest",
]
