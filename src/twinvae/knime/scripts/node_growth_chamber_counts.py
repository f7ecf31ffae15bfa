"""Counts per chamber and frame (summed when several images share chamber and frame)."""

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

counts = knio.input_tables[0].to_pandas()
knio.output_tables[0] = knio.Table.from_pandas(tk.chamber_counts(counts))
