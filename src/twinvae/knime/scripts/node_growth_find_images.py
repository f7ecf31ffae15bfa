"""Find time-lapse images: chamber (xy position) and frame (t) from the file names or a table."""

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

frames = tk.find_time_lapse(knio.flow_variables, DATA.parent)
print(f"{len(frames)} images in {frames['chamber'].nunique()} chambers")
knio.output_tables[0] = knio.Table.from_pandas(frames)
