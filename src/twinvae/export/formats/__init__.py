"""Weight-format adapters: one module per bioimage.io weights format.

Each adapter writes its weights file for the exported network and can run a bundle's file
(``runner``) so that checks compare every format with the PyTorch reference.
"""

from __future__ import annotations

from twinvae.errors import ExportError
from twinvae.export.formats.base import Runner, WeightFormat
from twinvae.export.formats.onnx_format import OnnxFormat
from twinvae.export.formats.state_dict_format import StateDictFormat
from twinvae.export.formats.torchscript_format import TorchScriptFormat

FORMATS: tuple[WeightFormat, ...] = (StateDictFormat(), TorchScriptFormat(), OnnxFormat())
"""All formats a bundle holds; the first (pytorch_state_dict) is the others' parent."""

PARENT_FORMAT = FORMATS[0].name


def get_format(name: str) -> WeightFormat:
    """The adapter of a bioimage.io weights format name."""
    for weight_format in FORMATS:
        if weight_format.name == name:
            return weight_format
    raise ExportError(
        f"unsupported weights format {name!r}; expected one of {', '.join(f.name for f in FORMATS)}"
    )


__all__ = ["FORMATS", "PARENT_FORMAT", "Runner", "WeightFormat", "get_format"]
