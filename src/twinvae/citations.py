"""The papers of the method, cited by every bundle (rdf.yaml) and every KNIME workflow."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Citation:
    """One paper: the full reference, its DOI and a short title for links."""

    text: str
    doi: str
    short_title: str

    @property
    def url(self) -> str:
        return f"https://doi.org/{self.doi}"


TWIN_VAE_PAPER = Citation(
    text="Stallmann D, Göpfert JP, Schmitz J, Grünberger A, Hammer B. Towards an automatic "
    "analysis of CHO-K1 suspension growth in microfluidic single-cell cultivation. "
    "Bioinformatics 37(20):3632-3639 (2021)",
    doi="10.1093/bioinformatics/btab386",
    short_title="Twin-VAE cell counting (Bioinformatics 2021)",
)
TRANSFER_PAPER = Citation(
    text="Kenneweg P, Stallmann D, Hammer B. Novel transfer learning schemes based on "
    "Siamese networks and synthetic data. Neural Computing and Applications 35:8423 (2023)",
    doi="10.1007/s00521-022-08115-2",
    short_title="Transfer learning for Twin-VAE (NCA 2023)",
)
PAPERS: tuple[Citation, ...] = (TWIN_VAE_PAPER, TRANSFER_PAPER)
