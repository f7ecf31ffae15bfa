"""Transfer learning: twinvae transfer from the given bundle on the new labels."""

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

log = tk.finetune_run(
    "transfer", knio.input_tables[0].to_pandas(), knio.flow_variables, DATA.parent
)
knio.output_tables[0] = knio.Table.from_pandas(log)
