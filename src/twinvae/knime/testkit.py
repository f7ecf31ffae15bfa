"""Run KNIME node scripts without KNIME, and build tiny model bundles for tests and demos.

``run_node_script`` executes the exact text of a Python Script node against a stand-in for
``knime.scripting.io`` (input tables, output tables and images, flow variables, the workflow data
area). ``write_mean_intensity_bundle`` writes a small, valid bioimage.io-style bundle whose ONNX
model predicts ``scale * mean(preprocessed image)``, so expected counts are easy to compute.
"""

from __future__ import annotations

import contextlib
import io
import sys
import types
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

STANDIN_MODULES = (
    "knime",
    "knime.scripting",
    "knime.scripting.io",
    "knime.types",
    "knime.types.builtin",
)
SHIPPED_MODULE_NAMES = ("twinvae_bundle", "twinvae_finetune", "twinvae_growth", "twinvae_knime")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- stand-in for knime.scripting.io --------------------------------------------------------------


class StandinTable:
    """The part of ``knime.scripting.io.Table`` the node scripts use."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self._frame = frame.copy()

    @classmethod
    def from_pandas(
        cls, data_frame: pd.DataFrame, sentinel: Any = None, row_ids: str = "auto"
    ) -> StandinTable:
        if not isinstance(data_frame, pd.DataFrame):
            raise TypeError(f"Table.from_pandas needs a pandas DataFrame, got {type(data_frame)}")
        return cls(data_frame)

    def to_pandas(self) -> pd.DataFrame:
        return self._frame.copy()


class _FixedList(list[Any]):
    """A list whose length is fixed like knio's port lists."""

    def append(self, item: Any) -> None:
        raise IndexError("the number of ports is fixed by the node configuration")


@dataclass
class NodeRun:
    """What a node script produced."""

    output_tables: list[pd.DataFrame | None]
    output_images: list[bytes | None]
    flow_variables: dict[str, Any]
    stdout: str


@dataclass
class _Ports:
    inputs: Sequence[pd.DataFrame]
    output_tables: int
    output_images: int
    flow_variables: dict[str, Any] = field(default_factory=dict)


def _standin_modules(
    ports: _Ports, data_area: Path, png_cells: bool
) -> dict[str, types.ModuleType]:
    knime = types.ModuleType("knime")
    scripting = types.ModuleType("knime.scripting")
    knio = types.ModuleType("knime.scripting.io")
    knio.input_tables = _FixedList(StandinTable(frame) for frame in ports.inputs)  # type: ignore[attr-defined]
    knio.output_tables = _FixedList([None] * ports.output_tables)  # type: ignore[attr-defined]
    knio.output_images = _FixedList([None] * ports.output_images)  # type: ignore[attr-defined]
    knio.input_objects = _FixedList()  # type: ignore[attr-defined]
    knio.output_objects = _FixedList()  # type: ignore[attr-defined]
    knio.flow_variables = ports.flow_variables  # type: ignore[attr-defined]
    knio.Table = StandinTable  # type: ignore[attr-defined]
    knio.get_workflow_data_area_dir = lambda: str(data_area)  # type: ignore[attr-defined]
    knio.get_workflow_temp_dir = lambda: str(data_area.parent / ".tmp")  # type: ignore[attr-defined]
    knime.scripting = scripting  # type: ignore[attr-defined]
    scripting.io = knio  # type: ignore[attr-defined]
    knime_types = types.ModuleType("knime.types")
    builtin = types.ModuleType("knime.types.builtin")
    if png_cells:
        builtin.PNGImageValueFactory = type("PNGImageValueFactory", (), {})  # type: ignore[attr-defined]
    knime.types = knime_types  # type: ignore[attr-defined]
    knime_types.builtin = builtin  # type: ignore[attr-defined]
    return {
        "knime": knime,
        "knime.scripting": scripting,
        "knime.scripting.io": knio,
        "knime.types": knime_types,
        "knime.types.builtin": builtin,
    }


@contextlib.contextmanager
def _isolated_imports(modules: Mapping[str, types.ModuleType]) -> Iterator[None]:
    saved = {name: sys.modules.get(name) for name in (*STANDIN_MODULES, *SHIPPED_MODULE_NAMES)}
    saved_path = list(sys.path)
    saved_bytecode_flag = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # keep __pycache__ out of the workflow's data folder
    for name in SHIPPED_MODULE_NAMES:
        sys.modules.pop(name, None)
    sys.modules.update(modules)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        sys.dont_write_bytecode = saved_bytecode_flag
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def run_node_script(
    script: str,
    workflow_dir: Path,
    inputs: Sequence[pd.DataFrame] = (),
    output_tables: int = 0,
    output_images: int = 0,
    flow_variables: Mapping[str, Any] | None = None,
    png_cells: bool = True,
) -> NodeRun:
    """Execute a node script as KNIME would, with the workflow's data/ folder as data area."""
    variables = dict(flow_variables or {})
    variables.setdefault("knime.workspace", str(workflow_dir.parent))
    variables.setdefault("context.workflow.name", workflow_dir.name)
    variables.setdefault("context.workflow.absolute-path", str(workflow_dir))
    ports = _Ports(list(inputs), output_tables, output_images, variables)
    modules = _standin_modules(ports, workflow_dir / "data", png_cells)
    knio = modules["knime.scripting.io"]
    stdout = io.StringIO()
    with _isolated_imports(modules), contextlib.redirect_stdout(stdout):
        exec(compile(script, "<python script node>", "exec"), {"__name__": "__main__"})
    tables: list[pd.DataFrame | None] = []
    for index, table in enumerate(knio.output_tables):
        if table is not None and not isinstance(table, StandinTable):
            raise TypeError(f"output table {index} must be a knio.Table, got {type(table)}")
        tables.append(table.to_pandas() if table is not None else None)
    images: list[bytes | None] = []
    for index, image in enumerate(knio.output_images):
        if image is not None and not (
            isinstance(image, bytes) and (image.startswith(PNG_SIGNATURE) or b"<svg" in image[:200])
        ):
            raise TypeError(f"output image {index} must be PNG or SVG bytes")
        images.append(image)
    return NodeRun(tables, images, dict(knio.flow_variables), stdout.getvalue())


# -- tiny model bundles ---------------------------------------------------------------------------


def mean_intensity_onnx(scale: float, size: int = 128, fixed_batch: int | None = None) -> bytes:
    """ONNX model: (N, 1, size, size) float32 -> count (N, 1) = scale * mean, plus mu (N, 1)."""
    import onnx
    from onnx import TensorProto, helper

    batch: int | str = fixed_batch if fixed_batch is not None else "batch"
    graph = helper.make_graph(
        nodes=[
            helper.make_node("ReduceMean", ["raw"], ["mean4d"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Flatten", ["mean4d"], ["mu"], axis=1),
            helper.make_node("Mul", ["mu", "scale"], ["count"]),
        ],
        name="mean_intensity_counter",
        inputs=[helper.make_tensor_value_info("raw", TensorProto.FLOAT, [batch, 1, size, size])],
        outputs=[
            helper.make_tensor_value_info("count", TensorProto.FLOAT, [batch, 1]),
            helper.make_tensor_value_info("mu", TensorProto.FLOAT, [batch, 1]),
        ],
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="twinvae-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def torch_mean_intensity_onnx(scale: float, size: int = 128) -> bytes:
    """The same model written by torch.onnx.export (TorchScript exporter, dynamo=False)."""
    import tempfile

    import torch

    class MeanIntensity(torch.nn.Module):
        def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mu = raw.mean(dim=(1, 2, 3)).unsqueeze(1)
            return mu * scale, mu

    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript exporter is deprecated
        target = Path(scratch) / "weights.onnx"
        torch.onnx.export(
            MeanIntensity().eval(),
            (torch.zeros(2, 1, size, size),),
            str(target),
            input_names=["raw"],
            output_names=["count", "mu"],
            dynamic_axes={"raw": {0: "batch"}, "count": {0: "batch"}, "mu": {0: "batch"}},
            dynamo=False,
        )
        return target.read_bytes()


def default_preprocessing() -> list[dict[str, Any]]:
    return [
        {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
        {"id": "scale_linear", "kwargs": {"gain": 1.0 / 255.0, "offset": 0.0}},
    ]


def bundle_rdf(
    preprocessing: list[dict[str, Any]] | None = None,
    size: int = 128,
    weights_sha256: str | None = None,
) -> dict[str, Any]:
    """An rdf.yaml (format 0.5) with the fields the twinvae bundle contract promises."""
    onnx_entry: dict[str, Any] = {"source": "weights.onnx", "opset_version": 13}
    if weights_sha256:
        onnx_entry["sha256"] = weights_sha256
    return {
        "format_version": "0.5.3",
        "type": "model",
        "name": "Tiny mean-intensity counter",
        "description": "Test model: count = scale * mean grey value (0..1).",
        "authors": [{"name": "twinvae tests"}],
        "license": "MIT",
        "inputs": [
            {
                "id": "raw",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["grey"]},
                    {"type": "space", "id": "y", "size": size},
                    {"type": "space", "id": "x", "size": size},
                ],
                "data": {"type": "float32"},
                "preprocessing": preprocessing
                if preprocessing is not None
                else default_preprocessing(),
            }
        ],
        "outputs": [
            {
                "id": "count",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["count"]}],
                "data": {"type": "float32"},
            },
            {
                "id": "mu",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["mu"]}],
                "data": {"type": "float32"},
            },
        ],
        "weights": {
            "onnx": onnx_entry,
            "torchscript": {"source": "weights.pt"},
            "pytorch_state_dict": {"source": "weights.safetensors"},
        },
    }


def write_mean_intensity_bundle(
    path: Path,
    scale: float = 10.0,
    preprocessing: list[dict[str, Any]] | None = None,
    size: int = 128,
    exporter: str = "onnx",
    fixed_batch: int | None = None,
    with_sha256: bool = True,
) -> Path:
    """Write a zip bundle (rdf.yaml at the top level + weights.onnx) and return its path."""
    import hashlib

    if exporter == "onnx":
        weights = mean_intensity_onnx(scale, size, fixed_batch)
    elif exporter == "torch":
        weights = torch_mean_intensity_onnx(scale, size)
    else:
        raise ValueError(f"exporter must be 'onnx' or 'torch', got {exporter!r}")
    digest = hashlib.sha256(weights).hexdigest() if with_sha256 else None
    rdf = bundle_rdf(preprocessing, size, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("rdf.yaml", yaml.safe_dump(rdf, sort_keys=False))
        zipped.writestr("weights.onnx", weights)
    return path


def write_synthetic_time_lapse(
    folder: Path,
    rates_per_frame: Mapping[int, float],
    frames: int,
    initial_count: float = 1.0,
    scale: float = 10.0,
    experiment: str = "exp1",
) -> dict[int, list[float]]:
    """Uniform grey images whose mean-intensity count grows as N0 * exp(r * frame) per position.

    Names follow the microscope export, ``<experiment>xy<position>t<frame>c1.png``. Returns the
    exact counts the tiny bundle will predict (after 8-bit rounding of the grey value).
    """
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[int, list[float]] = {}
    for position, rate in rates_per_frame.items():
        counts[position] = []
        for frame in range(frames):
            target = initial_count * float(np.exp(rate * frame))
            grey = round(target / scale * 255.0)
            if not 0 <= grey <= 255:
                raise ValueError(f"count {target:.2f} does not fit 8-bit grey at scale {scale}")
            image = np.full((128, 128), grey, dtype=np.uint8)
            Image.fromarray(image).save(folder / f"{experiment}xy{position:02d}t{frame:03d}c1.png")
            counts[position].append(scale * grey / 255.0)
    return counts
