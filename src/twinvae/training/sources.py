"""What a transfer starts from: a run's checkpoint, a bioimage.io bundle, or a zoo model.

``twinvae transfer --from`` takes any of

- ``RUN/`` or ``RUN/best.pt`` (``last.pt``): a run of this project, the whole Twin-VAE;
- ``BUNDLE.zip`` (or its unpacked folder): a bundle from ``twinvae export`` or ``zoo build``;
  it attaches the whole Twin-VAE (``twinvae_weights.safetensors``) unless it was exported
  before bundles carried it, and then holds only the counting path;
- ``NAME`` or ``zoo:NAME``: a model of the zoo (``twinvae zoo list``; ``$TWINVAE_ZOO_DIR``);
  also its weights file ``weights/NAME.safetensors``.

A source with only the counting path (natural encoder, shared encoder, regressor) fills those
parts of a TwinVAE; the synthetic encoder and the decoders keep their fresh initialisation. The
Twin-VAE's transfer with the synthetic twin cannot start from that, so such sources allow only
natural-only runs (`check_transfer_plan`). Bundles are read with the runtime's checked opener;
nothing is unpickled (safetensors, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import ValidationError

from twinvae.config import ExperimentConfig, ModelConfig
from twinvae.errors import CheckpointError, ConfigError, TwinVAEWarning
from twinvae.models.twin_vae import TwinVAE

SourceKind = Literal["checkpoint", "bundle", "zoo"]
ZOO_PREFIX = "zoo:"
_ZOO_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_CHECKPOINT_SUFFIXES = (".pt", ".pth")
_BUNDLE_CONFIG = "config.yaml"
WHOLE_SOURCES = (
    "a run's checkpoint (RUN/best.pt), a bundle exported by this twinvae (it attaches "
    "twinvae_weights.safetensors), or a zoo model that `twinvae zoo list` shows as "
    "'whole Twin-VAE'"
)
"""Where the whole Twin-VAE comes from, for messages about sources that lack it."""


@dataclass
class TransferSource:
    """The weights a transfer starts from.

    ``state`` uses the TwinVAE's key names; without ``complete`` it holds only the counting
    path. ``spec`` is how the run's config records the source (a path, or ``zoo:NAME``).
    """

    spec: str
    kind: SourceKind
    description: str
    model: ModelConfig
    state: dict[str, torch.Tensor]
    complete: bool

    @property
    def lacks(self) -> str | None:
        """What the source does not hold (None when it is the whole Twin-VAE)."""
        if self.complete:
            return None
        return (
            f"{self.description} holds only the counting path of a Twin-VAE (natural encoder, "
            "shared encoder, regressor): no synthetic encoder and no decoders"
        )

    def load_into(self, model: TwinVAE) -> None:
        """Copy the weights into ``model`` (the rest of it stays as initialised)."""
        try:
            if self.complete:
                model.load_state_dict(self.state)
                return
            result = model.load_state_dict(self.state, strict=False)
        except RuntimeError as error:
            raise CheckpointError(
                f"{self.description}: weights do not fit the model: {error}"
            ) from None
        from twinvae.export.full_weights import is_counting_key

        expected = {key for key in model.state_dict() if is_counting_key(key, model.config)}
        missing = sorted(expected - self.state.keys())
        if result.unexpected_keys or missing:
            raise CheckpointError(
                f"{self.description}: the counting-path weights do not fit the model "
                f"(unexpected {sorted(result.unexpected_keys)[:5]}, missing {missing[:5]})"
            )


def resolve_transfer_source(spec: str | Path, zoo_dir: Path | None = None) -> TransferSource:
    """Load the source named by ``spec`` (see the module docstring for the forms)."""
    text = str(spec).strip()
    if text.startswith(ZOO_PREFIX):
        return _from_zoo(text[len(ZOO_PREFIX) :], zoo_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        return _from_file(path)
    if _ZOO_NAME.match(text):
        return _from_zoo(text, zoo_dir, given_as_path=True)
    raise CheckpointError(
        f"--from {text}: no such file or folder; give a run folder, a checkpoint (.pt), a "
        "bundle (.zip) or the name of a zoo model (`twinvae zoo list`)"
    )


def _from_folder(path: Path) -> TransferSource:
    from twinvae.runtime.twinvae_bundle import RDF_NAME

    if (path / RDF_NAME).is_file():
        return _from_bundle(path)
    zoo = path if (path / "collection.yaml").is_file() else path.parent
    if (zoo / "collection.yaml").is_file() and (path == zoo or path.name == "weights"):
        raise CheckpointError(
            f"--from {path}: is a model zoo folder; give one of its models by name instead "
            f"(models: {_zoo_names(zoo)}), or its bundle (`twinvae zoo build NAME`)"
        )
    return _from_checkpoint(path)


def _from_file(path: Path) -> TransferSource:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _from_safetensors(path)
    if suffix in _CHECKPOINT_SUFFIXES:
        return _from_checkpoint(path)
    if suffix == ".zip" or _is_bundle_zip(path):
        return _from_bundle(path)
    return _from_checkpoint(path)


def _is_bundle_zip(path: Path) -> bool:
    """A zip with rdf.yaml (torch checkpoints are zips too, without one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(Path(name).name == "rdf.yaml" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# --- run checkpoints ---------------------------------------------------------------------------


def _from_checkpoint(path: Path) -> TransferSource:
    from twinvae.training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    return TransferSource(
        spec=str(path),
        kind="checkpoint",
        description=f"checkpoint {path}",
        model=checkpoint.config.model,
        state=checkpoint.model_state,
        complete=True,
    )


# --- zoo ---------------------------------------------------------------------------------------


def _zoo_folder(zoo_dir: Path | None) -> Path:
    from twinvae.model_zoo.zoo import default_zoo_dir

    return zoo_dir if zoo_dir is not None else default_zoo_dir()


def _zoo_names(zoo_dir: Path) -> str:
    from twinvae.model_zoo.manifest import load_manifest

    return ", ".join(entry.name for entry in load_manifest(zoo_dir).models) or "none"


def _from_zoo(name: str, zoo_dir: Path | None, *, given_as_path: bool = False) -> TransferSource:
    from twinvae.export.full_weights import twin_state_from_counting
    from twinvae.model_zoo.manifest import MANIFEST_FILE, load_manifest
    from twinvae.model_zoo.zoo import source_from_entry

    folder = _zoo_folder(zoo_dir)
    if not (folder / MANIFEST_FILE).is_file():
        where = "no such file or folder, and " if given_as_path else ""
        raise CheckpointError(
            f"--from {name}: {where}no model zoo at {folder} to look the name up in; set "
            "TWINVAE_ZOO_DIR to the zoo folder (holding collection.yaml), or give a checkpoint "
            "or bundle path"
        )
    manifest = load_manifest(folder)
    if name not in {entry.name for entry in manifest.models}:
        where = "no such file or folder, and " if given_as_path else ""
        raise CheckpointError(
            f"--from {name}: {where}no model of that name in the zoo at {folder} (models: "
            f"{_zoo_names(folder)})"
        )
    source = source_from_entry(folder, manifest.get(name))
    complete = source.full_state is not None
    return TransferSource(
        spec=f"{ZOO_PREFIX}{name}",
        kind="zoo",
        description=f"zoo model {name}",
        model=source.config.model,
        state=source.full_state
        if source.full_state is not None
        else twin_state_from_counting(source.state),
        complete=complete,
    )


def _from_safetensors(path: Path) -> TransferSource:
    """A zoo weights file (looked up in its zoo), or a whole Twin-VAE written by twinvae."""
    from twinvae.export.full_weights import read_full_weights
    from twinvae.model_zoo.manifest import MANIFEST_FILE, load_manifest

    zoo = path.parent.parent
    if path.parent.name == "weights" and (zoo / MANIFEST_FILE).is_file():
        for entry in load_manifest(zoo).models:
            if (zoo / entry.weights).resolve() == path.resolve():
                return _from_zoo(entry.name, zoo)
    try:
        state, model = read_full_weights(path.read_bytes(), str(path))
    except CheckpointError as error:
        raise CheckpointError(
            f"{error}; a safetensors file of the counting path names no model sizes: give the "
            "zoo model's name (`twinvae zoo list`) or its bundle (`twinvae zoo build NAME`)"
        ) from None
    return TransferSource(
        spec=str(path),
        kind="checkpoint",
        description=f"weights file {path}",
        model=model,
        state=state,
        complete=True,
    )


# --- bundles -----------------------------------------------------------------------------------


def _verified(files: Any, entry: Any, what: str) -> bytes:
    """A member named by an rdf.yaml entry (``source``, ``sha256``), its sha256 checked."""
    if not isinstance(entry, dict) or not entry.get("source"):
        raise CheckpointError(f"model bundle {files.path}: rdf.yaml names no {what}")
    data: bytes = files.read(str(entry["source"]))
    expected = entry.get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != str(expected).lower():
        raise CheckpointError(
            f"model bundle {files.path}: {entry['source']} does not match its sha256 in rdf.yaml "
            "(changed after packaging)"
        )
    return data


def _bundle_model(files: Any) -> ModelConfig:
    """The model sizes of the training config a twinvae bundle attaches (config.yaml)."""
    if _BUNDLE_CONFIG not in files.names:
        raise CheckpointError(
            f"model bundle {files.path}: has no {_BUNDLE_CONFIG}, so it was not exported by "
            "twinvae and cannot be fine-tuned with it"
        )
    try:
        data = yaml.safe_load(files.read(_BUNDLE_CONFIG))
        return ModelConfig.model_validate((data or {}).get("model") or {})
    except (yaml.YAMLError, AttributeError, ValidationError) as error:
        raise CheckpointError(
            f"model bundle {files.path}: {_BUNDLE_CONFIG} holds no valid model section ({error})"
        ) from None


def _from_bundle(path: Path) -> TransferSource:
    from twinvae.export.full_weights import (
        FULL_WEIGHTS_FILE,
        read_full_weights,
        twin_state_from_counting,
    )
    from twinvae.runtime import twinvae_bundle as runtime

    try:
        with runtime.open_bundle(path) as files:
            info = runtime.read_bundle_info(files)
            model = _bundle_model(files)
            description = f"bundle {path}"
            if runtime.has_full_weights(info):
                entry = next(
                    item
                    for item in info.rdf["attachments"]
                    if isinstance(item, dict) and item.get("source") == FULL_WEIGHTS_FILE
                )
                data = _verified(files, entry, FULL_WEIGHTS_FILE)
                state, stored_model = read_full_weights(data, f"{path}: {FULL_WEIGHTS_FILE}")
                if stored_model != model:
                    raise CheckpointError(
                        f"model bundle {path}: the model sizes of {FULL_WEIGHTS_FILE} differ "
                        f"from those of {_BUNDLE_CONFIG}"
                    )
                return TransferSource(str(path), "bundle", description, model, state, True)
            weights = (info.rdf.get("weights") or {}).get("pytorch_state_dict")
            data = _verified(files, weights, "pytorch_state_dict weights")
    except runtime.BundleError as error:
        raise CheckpointError(str(error)) from None
    try:
        counting = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"model bundle {path}: its pytorch_state_dict weights are not readable ({error})"
        ) from None
    if not isinstance(counting, dict) or not all(
        isinstance(value, torch.Tensor) for value in counting.values()
    ):
        raise CheckpointError(f"model bundle {path}: its pytorch_state_dict is not a state dict")
    return TransferSource(
        str(path), "bundle", description, model, twin_state_from_counting(counting), False
    )


# --- what a source allows ----------------------------------------------------------------------

NATURAL_ONLY_STRATEGIES = "simultaneous or thaw, or frozen-outer / frozen-core with --no-decoder"


def _freshly_frozen(config: ExperimentConfig) -> str | None:
    """The untrained part a strategy would freeze when only the counting path was loaded."""
    transfer = config.transfer
    if transfer is None or config.loss.decoder_off:
        return None
    if transfer.strategy == "frozen-outer":
        return "the natural decoder (an outer layer)"
    if transfer.strategy == "frozen-core" and config.model.regressor_input == "latent":
        return "the shared decoder (a core layer)"
    return None


def check_transfer_plan(source: TransferSource, config: ExperimentConfig) -> None:
    """Refuse runs a counting-path-only source cannot start: the Twin-VAE's transfer with the
    synthetic twin, and strategies that would freeze freshly initialised decoders."""
    lacks = source.lacks
    if lacks is None:
        return
    if not config.data.natural_only:
        raise ConfigError(
            f"--from {source.spec}: {lacks}, so the Twin-VAE's transfer with the synthetic twin "
            "cannot start from it. Train on the natural images alone with --natural-only "
            f"(data.natural_only=true; strategies {NATURAL_ONLY_STRATEGIES}; the decoders then "
            f"start untrained), or start from the whole Twin-VAE: {WHOLE_SOURCES}"
        )
    frozen = _freshly_frozen(config)
    if frozen is not None:
        assert config.transfer is not None
        raise ConfigError(
            f"--from {source.spec}: {lacks}; strategy {config.transfer.strategy} would freeze "
            f"{frozen}, which starts untrained. Use --strategy simultaneous or thaw, or switch "
            "the decoders off (--no-decoder)"
        )


def warn_if_partial(source: TransferSource) -> None:
    """Say (TwinVAEWarning) which parts start from the source and which start untrained."""
    lacks = source.lacks
    if lacks is None:
        return
    warnings.warn(
        TwinVAEWarning(
            f"{lacks}. The natural encoder, shared encoder and regressor start from it; the "
            "decoders and the synthetic encoder start freshly initialised, and the run trains "
            "on the natural images alone"
        ),
        stacklevel=3,
    )
