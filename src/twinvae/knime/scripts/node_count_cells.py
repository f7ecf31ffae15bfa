"""Count cells: run the ONNX weights of the model bundle (variable bundle) on every image."""

import sys
from pathlib import Path

import knime.scripting.io as knio

try:
    DATA = Path(knio.get_workflow_data_area_dir())
except AttributeError:  # KNIME versions without the data-area helper
    DATA = Path(knio.flow_variables["context.workflow.absolute-path"]) / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
import twinvae_knime as tk

images = knio.input_tables[0].to_pandas()
counts = tk.count_cells(images, knio.flow_variables, DATA.parent, thumbnails=True)
tk.write_results(counts, knio.flow_variables, DATA.parent)
knio.output_tables[0] = knio.Table.from_pandas(counts)
