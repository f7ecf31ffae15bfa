"""metrics.csv: one row per epoch, appended as the run goes, cut back on resume."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twinvae.fileio import atomic_writer

METRIC_COLUMNS = [
    "epoch",
    "loss",
    "natural_rec",
    "natural_reg",
    "natural_kl",
    "synthetic_rec",
    "synthetic_reg",
    "synthetic_kl",
    "val_mae",
    "val_mre",
    "val_accuracy",
    "synthetic_val_mae",
    "lr",
    "trainable",
    "seconds",
    "images_per_second",
]


class MetricsLog:
    """The run's metrics.csv (epochs are 1-based there)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one epoch's row (missing columns stay empty); writes the header first."""
        new = not self.path.exists()
        with self.path.open("a", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({key: row.get(key, "") for key in METRIC_COLUMNS})

    def keep_epochs(self, last_epoch: int) -> None:
        """Drop the rows after epoch ``last_epoch`` (1-based): those a run wrote after the
        checkpoint it resumes from."""
        if not self.path.exists():
            return
        with self.path.open(newline="", encoding="utf-8") as stream:
            rows = [r for r in csv.DictReader(stream) if int(r["epoch"]) <= last_epoch]
        with atomic_writer(self.path) as stream:  # a kill here keeps the old rows
            writer = csv.DictWriter(stream, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
