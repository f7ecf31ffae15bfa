"""The published numbers the experiments are compared with (Kenneweg, Stallmann, Hammer 2023).

Table 2 of the transfer-learning paper, measured on the natural labelled test sets Nat-*-L-Te;
training times are seconds on one NVIDIA P100. ``None`` marks a cell the paper leaves empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Modality = Literal["bf", "pc"]


@dataclass(frozen=True)
class PaperResult:
    """One modality's cell of a Table 2 row (MRE and accuracy in percent, as printed)."""

    mae: float | None
    mre_percent: float | None
    accuracy_percent: float | None
    train_seconds: float | None


@dataclass(frozen=True)
class PaperRow:
    """One method of Table 2."""

    key: str
    method: str
    pc: PaperResult
    bf: PaperResult

    def for_modality(self, modality: Modality) -> PaperResult:
        return self.pc if modality == "pc" else self.bf


_EMPTY = PaperResult(None, None, None, None)

PAPER_TABLE2: dict[str, PaperRow] = {
    row.key: row
    for row in (
        PaperRow(
            "twinvae-natural-only",
            "Twin-VAE (natural only)",
            PaperResult(1.07, 20.1, 39.8, 180_000),
            PaperResult(0.91, 13.3, 23.4, 150_000),
        ),
        PaperRow(
            "twinvae-max-acc",
            "Twin-VAE max-acc",
            PaperResult(0.60, 5.92, 57.8, 400_000),
            PaperResult(0.68, 7.60, 53.2, 310_000),
        ),
        PaperRow(
            "transfer",
            "Transfer Twin-VAE",
            PaperResult(0.66, 6.46, 53.7, 40_000),
            PaperResult(0.52, 5.47, 60.74, 31_000),
        ),
        PaperRow(
            "double-transfer",
            "double Transfer Twin-VAE",
            PaperResult(0.58, 5.56, 58.7, 71_000),
            _EMPTY,
        ),
        PaperRow(
            "bit-resnet",
            "BiT (ResNet)",
            PaperResult(2.20, None, 26.1, 9_000),
            PaperResult(1.03, None, 43.1, 5_400),
        ),
        PaperRow(
            "watershed",
            "watershed (Bioinformatics paper code)",
            PaperResult(1.66, 29.0, 23.0, None),
            PaperResult(2.39, 32.0, 32.0, None),
        ),
    )
}
"""Table 2 of the transfer-learning paper, keyed by the names plans use in ``paper:``."""


@dataclass(frozen=True)
class Goal:
    """The bar of the reproduction issue: the paper's best natural-test numbers per modality."""

    modality: Modality
    mae: float
    accuracy_percent: float
    source: str
    max_train_seconds: float = 3 * 3600.0


GOALS: dict[Modality, Goal] = {
    "pc": Goal("pc", 0.58, 58.7, "double Transfer Twin-VAE"),
    "bf": Goal("bf", 0.52, 60.74, "Transfer Twin-VAE"),
}
"""Match or beat these on Nat-*-L-Te with at most 3 CPU-hours of training per model."""

PAPER_HARDWARE = "one NVIDIA P100 GPU"
