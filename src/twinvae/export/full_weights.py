"""The whole Twin-VAE's weights as one safetensors file: what fine-tuning starts from.

A bundle's weight formats hold only the counting path (natural encoder, shared encoder,
regressor). The Twin-VAE's own transfer also needs the synthetic encoder and both decoders, so
bundles attach the whole state dict as ``FULL_WEIGHTS_FILE`` and zoo entries store it.

Storage: the counting path (with the shared decoder when the regressor reads its output) stays
float32, so that it is exactly the counting network of the bundle; every other learned weight
and bias (synthetic encoder, decoders) is stored as float16, which halves the file and only
rounds the starting point of a fine-tuning. Batch-norm statistics stay float32, and so does any
tensor beyond float16's range. Loading gives float32 tensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

from twinvae.config import ModelConfig
from twinvae.errors import CheckpointError
from twinvae.fileio import atomic_writer
from twinvae.runtime.twinvae_bundle import FULL_WEIGHTS_FILE

FULL_WEIGHTS_FORMAT = "twinvae-twin-vae/1"
"""The safetensors metadata ``format`` of a whole Twin-VAE."""
COUNTING_FORMAT = "twinvae-counting-network/1"
"""The safetensors metadata ``format`` of a counting path alone (the first zoo entries)."""
FLOAT16_MAX = 65504.0
_NATURAL_ENCODER = "encoders.natural."
_COUNTING_ENCODER = "encoder."
_SHARED_PREFIXES = ("shared_encoder.", "regressor.")
_STATISTICS = ("running_mean", "running_var")

__all__ = [
    "COUNTING_FORMAT",
    "FULL_WEIGHTS_FILE",
    "FULL_WEIGHTS_FORMAT",
    "counting_state",
    "full_weights_bytes",
    "is_counting_key",
    "read_full_weights",
    "twin_state_from_counting",
    "write_full_weights",
]


def is_counting_key(key: str, model: ModelConfig) -> bool:
    """Whether a TwinVAE state-dict key belongs to the natural counting path."""
    prefixes: tuple[str, ...] = (_NATURAL_ENCODER, *_SHARED_PREFIXES)
    if model.regressor_input == "shared_decoder":
        prefixes = (*prefixes, "shared_decoder.")
    return key.startswith(prefixes)


def _stored(key: str, tensor: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    value = tensor.detach().to("cpu").contiguous()
    if (
        is_counting_key(key, model)
        or not value.is_floating_point()
        or key.rsplit(".", 1)[-1] in _STATISTICS
        or (value.numel() and float(value.abs().max()) > FLOAT16_MAX)
    ):
        return value.clone() if value.dtype != torch.float16 else value.float()
    return value.to(torch.float16)


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors format, written in a fixed order: the same tensors and metadata give
    the same bytes (safetensors' own writer orders the metadata by a randomly seeded hash map).

    Header: 8-byte little-endian length, then JSON (metadata first, then the tensors by falling
    element size and name, as safetensors orders them, so each is aligned), padded with spaces
    to a multiple of 8; then the tensors' bytes back to back.
    """
    if sys.byteorder != "little":  # safetensors stores little-endian values
        raise CheckpointError("writing safetensors needs a little-endian machine")
    order = sorted(tensors, key=lambda key: (-tensors[key].element_size(), key))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs: list[bytes] = []
    offset = 0
    for key in order:
        tensor = tensors[key].detach().to("cpu").contiguous()
        if tensor.dtype not in _DTYPES:
            raise CheckpointError(f"{key}: tensors of type {tensor.dtype} are not stored")
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[key] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def full_weights_bytes(state: dict[str, torch.Tensor], model: ModelConfig) -> bytes:
    """The safetensors bytes of a TwinVAE state dict (storage as in the module docstring);
    the metadata names the format and the model's sizes. Same state, same bytes."""
    tensors = {key: _stored(key, value, model) for key, value in state.items()}
    metadata = {"format": FULL_WEIGHTS_FORMAT, "model": model.model_dump_json()}
    return safetensors_bytes(tensors, metadata)


def write_full_weights(path: Path, state: dict[str, torch.Tensor], model: ModelConfig) -> None:
    """Write `full_weights_bytes` to ``path`` (atomically, readable like any new file)."""
    with atomic_writer(path, binary=True) as stream:
        stream.write(full_weights_bytes(state, model))


def _metadata(data: bytes, origin: str) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (header: 8-byte length, then JSON)."""
    if len(data) < 8:
        raise CheckpointError(f"{origin}: not a safetensors file (only {len(data)} bytes)")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise CheckpointError(f"{origin}: not a safetensors file (header length {length})")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{origin}: not a safetensors file ({error})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def read_full_weights(data: bytes, origin: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The float32 TwinVAE state dict and model sizes stored by `full_weights_bytes`.

    Errors (CheckpointError) name ``origin`` and what the file is instead.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    metadata = _metadata(data, origin)
    kind = metadata.get("format")
    if kind == COUNTING_FORMAT:
        raise CheckpointError(
            f"{origin}: holds only the counting path of a Twin-VAE ({COUNTING_FORMAT}), not the "
            "whole model"
        )
    if kind != FULL_WEIGHTS_FORMAT:
        raise CheckpointError(
            f"{origin}: not the weights of a whole Twin-VAE (safetensors metadata format "
            f"{kind!r}, expected {FULL_WEIGHTS_FORMAT!r})"
        )
    try:
        model = ModelConfig.model_validate_json(metadata.get("model", ""))
    except ValidationError as error:
        raise CheckpointError(
            f"{origin}: model sizes in the metadata are invalid: {error}"
        ) from None
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as error:
        raise CheckpointError(f"{origin}: not a readable safetensors file ({error})") from None
    state = {
        key: value.float() if value.dtype == torch.float16 else value
        for key, value in tensors.items()
    }
    return state, model


def counting_state(
    full_state: dict[str, torch.Tensor], model: ModelConfig
) -> dict[str, torch.Tensor]:
    """The counting network's state dict (its own key names) taken from a TwinVAE state dict."""
    state: dict[str, torch.Tensor] = {}
    for key, value in full_state.items():
        if not is_counting_key(key, model):
            continue
        name = (
            _COUNTING_ENCODER + key.removeprefix(_NATURAL_ENCODER)
            if key.startswith(_NATURAL_ENCODER)
            else key
        )
        value = value.detach().to("cpu")
        state[name] = (value.float() if value.is_floating_point() else value).clone().contiguous()
    return state


def twin_state_from_counting(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A counting network's state dict under the TwinVAE's key names (a partial TwinVAE state)."""
    return {
        (
            _NATURAL_ENCODER + key.removeprefix(_COUNTING_ENCODER)
            if key.startswith(_COUNTING_ENCODER)
            else key
        ): value
        for key, value in state.items()
    }
