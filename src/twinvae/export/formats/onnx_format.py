"""ONNX weights: one self-contained file, dynamic batch axis, opset >= 17."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twinvae.errors import ExportError
from twinvae.export.formats.base import Runner, entry_source
from twinvae.export.network import INPUT_ID, NetworkSpec

OPSET_VERSION = 18
MIN_OPSET_VERSION = 17
BATCH_DIM = "batch"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs optional-dependency notes and prints progress; hide both."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _strip_source_locations(model: Any) -> None:
    """Drop the exporter's per-node Python stack traces: they hold this machine's file paths,
    which would make the bytes depend on where twinvae is installed."""
    graphs = [model.graph, *(f for f in model.functions)]
    for graph in graphs:
        for node in graph.node:
            keep = [p for p in node.metadata_props if "stack_trace" not in p.key]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
            node.doc_string = ""


class OnnxFormat:
    """torch.onnx (dynamo exporter, needs onnxscript) with initializers stored inside the file."""

    name = "onnx"
    file_name = "weights.onnx"

    def write(
        self, network: nn.Module, spec: NetworkSpec, folder: Path, example: torch.Tensor
    ) -> dict[str, Any]:
        import onnx

        batch = torch.export.Dim(BATCH_DIM, min=1)
        # Export into a private folder first so that any side file (external data) is noticed.
        with tempfile.TemporaryDirectory() as scratch, _quiet_exporter():
            target = Path(scratch) / self.file_name
            try:
                program = torch.onnx.export(
                    network.eval(),
                    (example,),
                    dynamo=True,
                    opset_version=OPSET_VERSION,
                    input_names=[INPUT_ID],
                    output_names=list(spec.output_ids),
                    dynamic_shapes=({0: batch},),
                    external_data=False,
                    verbose=False,
                )
            except ModuleNotFoundError as error:
                raise ExportError(
                    f"ONNX export needs the '{error.name}' package (pip install onnxscript)"
                ) from error
            if program is None:
                raise ExportError("torch.onnx.export returned no program")
            program.save(str(target), external_data=False)
            extra = sorted(p.name for p in Path(scratch).iterdir() if p.name != self.file_name)
            if extra:
                raise ExportError(f"ONNX export wrote side files {extra}; expected one file")
            model = onnx.load(str(target), load_external_data=False)
        _strip_source_locations(model)
        onnx.save_model(model, str(folder / self.file_name))
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        return {"source": self.file_name, "opset_version": int(opset)}

    def runner(self, folder: Path, entry: Mapping[str, Any]) -> Runner:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(
            str(entry_source(folder, entry, "onnx")),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        input_name = session.get_inputs()[0].name

        def run(images: np.ndarray) -> list[np.ndarray]:
            outputs = session.run(None, {input_name: images.astype(np.float32)})
            return [np.asarray(o, dtype=np.float32) for o in outputs]

        return run
