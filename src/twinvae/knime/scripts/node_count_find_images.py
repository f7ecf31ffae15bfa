"""Find images: list the image files of the folder in the workflow variable image_folder."""

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

images = tk.find_images(knio.flow_variables, DATA.parent)
print(f"{len(images)} images found")
knio.output_tables[0] = knio.Table.from_pandas(images)
