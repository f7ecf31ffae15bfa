"""TorchScript weights, traced from the reference network."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twinvae.export.formats.base import Runner, as_output_list, entry_source
from twinvae.export.network import NetworkSpec


@contextlib.contextmanager
def _no_deprecation_warnings() -> Iterator[None]:
    """torch 2.13 deprecates TorchScript, but bioimage.io's torchscript format needs it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@contextlib.contextmanager
def _fresh_script_state() -> Iterator[torch._C.CompilationUnit]:
    """Trace as if in a fresh interpreter.

    TorchScript names the types of traced modules in a process-wide compilation unit and
    mangles names that already exist there (``___torch_mangle_N`` with a growing counter), so the
    same network traced after other traces would give different bytes. A new compilation unit
    and concrete-type cache for the duration of one trace make the names canonical.
    """
    from torch.jit import _recursive, _state

    saved_unit, saved_store = _state._python_cu, _recursive.concrete_type_store
    _state._python_cu = torch._C.CompilationUnit()
    _recursive.concrete_type_store = _recursive.ConcreteTypeStore()
    try:
        yield _state._python_cu
    finally:
        _state._python_cu, _recursive.concrete_type_store = saved_unit, saved_store


def _copy_without_debug_info(source: Path, target: Path) -> None:
    """Rewrite a TorchScript archive without its *.debug_pkl records.

    Those hold the Python call stack of the tracing (absolute paths, callers), so the same
    weights would give different bytes depending on who exported them and from where. They only
    serve error messages; torch.jit.load does not need them.
    """
    reader = torch._C.PyTorchFileReader(str(source))
    writer = torch._C.PyTorchFileWriter(str(target))
    for name in reader.get_all_records():
        if name.endswith(".debug_pkl") or name.startswith(".data/"):
            continue  # the writer adds its own .data/ records (serialization id)
        data = reader.get_record(name)
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()


class TorchScriptFormat:
    """torch.jit.trace of the eval-mode network (no data-dependent control flow)."""

    name = "torchscript"
    file_name = "weights_torchscript.pt"

    def write(
        self, network: nn.Module, spec: NetworkSpec, folder: Path, example: torch.Tensor
    ) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as scratch:
            raw = Path(scratch) / self.file_name  # torch names the archive folder after the file
            with torch.no_grad(), _no_deprecation_warnings(), _fresh_script_state() as unit:
                traced = torch.jit.trace(
                    network.eval(),
                    example,
                    check_trace=False,  # the export's agreement check compares the outputs
                    _store_inputs=False,
                    _compilation_unit=unit,
                )
                traced.save(str(raw))
            _copy_without_debug_info(raw, folder / self.file_name)
        return {
            "source": self.file_name,
            "pytorch_version": torch.__version__.split("+")[0],
        }

    def runner(self, folder: Path, entry: Mapping[str, Any]) -> Runner:
        source = entry_source(folder, entry, "torchscript")
        with _no_deprecation_warnings():
            module = torch.jit.load(str(source), map_location="cpu")
        module.eval()

        def run(images: np.ndarray) -> list[np.ndarray]:
            with torch.no_grad():
                return as_output_list(module(torch.from_numpy(images)))

        return run
