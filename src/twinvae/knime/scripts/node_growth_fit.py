"""Fit exponential growth per chamber: growth rate, doubling time, growth-curve plot."""

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

per_frame = knio.input_tables[0].to_pandas()
fits, plot = tk.growth_fits(per_frame, knio.flow_variables)
tk.write_results(fits, knio.flow_variables, DATA.parent, plot=plot)
knio.output_tables[0] = knio.Table.from_pandas(fits)
knio.output_images[0] = plot
