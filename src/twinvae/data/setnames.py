"""The data set names of Table 1 (Kenneweg, Stallmann, Hammer 2023), e.g. "Nat-PC-L-Tr".

<Nat|Syn>-<BF|PC>-<L|U>-<Tr|Te>: natural or synthetic, modality, labelled (count > 0) or
unlabelled (count 0), train or test split. Synthetic sets are labelled only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twinvae.data.cho_k1 import cho_k1_root
from twinvae.data.imageset import Domain, ImageSet, Modality
from twinvae.data.readers import Split, read_cho_k1
from twinvae.errors import ConfigError

SET_NAMES: tuple[str, ...] = tuple(
    f"Nat-{modality}-{label}-{split}"
    for modality in ("BF", "PC")
    for split in ("Tr", "Te")
    for label in ("L", "U")
) + tuple(f"Syn-{modality}-L-{split}" for modality in ("BF", "PC") for split in ("Tr", "Te"))

DEFAULT_SYNTHETIC_COUNT = 1000
# Offset between the generator seeds of the Tr and Te sets, so they never hold the same images.
TEST_SEED_OFFSET = 1_000_003

_DOMAINS: dict[str, Domain] = {"nat": "natural", "syn": "synthetic"}
_SPLITS: dict[str, Split] = {"tr": "train", "te": "test"}


@dataclass(frozen=True)
class SetName:
    """A parsed Table 1 set name."""

    domain: Domain
    modality: Modality
    labelled: bool
    split: Split

    def __str__(self) -> str:
        return format_set_name(self.domain, self.modality, self.labelled, self.split)


def format_set_name(domain: Domain, modality: Modality, labelled: bool, split: Split) -> str:
    """The canonical Table 1 name, e.g. ("natural", "pc", True, "train") -> "Nat-PC-L-Tr"."""
    prefix = "Nat" if domain == "natural" else "Syn"
    return f"{prefix}-{modality.upper()}-{'L' if labelled else 'U'}-{split[:2].title()}"


def parse_set_name(name: str) -> SetName:
    """Parse a set name case-insensitively; unknown names raise ConfigError listing valid ones."""
    canonical = {valid.lower(): valid for valid in SET_NAMES}.get(name.strip().lower())
    if canonical is None:
        raise ConfigError(f"unknown data set name {name!r}; valid names: {', '.join(SET_NAMES)}")
    domain, modality, label, split = canonical.lower().split("-")
    return SetName(
        domain=_DOMAINS[domain],
        modality="bf" if modality == "bf" else "pc",
        labelled=label == "l",
        split=_SPLITS[split],
    )


def resolve_set_name(
    name: str,
    data_root: Path | str | None,
    *,
    synthetic_count: int = DEFAULT_SYNTHETIC_COUNT,
    seed: int = 0,
    skip_bad: bool = False,
    resize: bool = False,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> ImageSet:
    """The image set a Table 1 name stands for.

    Nat-*: the labelled or unlabelled part of the CHO-K1 split under data_root (the folder
    holding bf/ and pc/, or a modality folder; None: $TWINVAE_CHO_K1). Syn-*: synthetic_count
    generated images; the Te set uses seed + TEST_SEED_OFFSET so it never repeats the Tr images
    of the same seed.
    """
    parsed = parse_set_name(name)
    if parsed.domain == "synthetic":
        if synthetic_count < 1:
            raise ConfigError(f"synthetic_count must be at least 1, got {synthetic_count}")
        from twinvae.data.synthetic import SynthConfig, generate

        split_seed = seed if parsed.split == "train" else seed + TEST_SEED_OFFSET
        generated = generate(
            SynthConfig(modality=parsed.modality), synthetic_count, seed=split_seed
        )
        generated.source = str(parsed)
        return generated
    full = read_cho_k1(
        cho_k1_root(data_root, needed_for=str(parsed)),
        parsed.modality,
        parsed.split,
        skip_bad=skip_bad,
        resize=resize,
        cache_dir=cache_dir,
        progress=progress,
    )
    part = full.labelled_only() if parsed.labelled else full.unlabelled_only()
    part.source = f"{parsed} ({full.source})"
    part.skipped = list(full.skipped)
    return part
