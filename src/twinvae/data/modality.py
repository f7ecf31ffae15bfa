"""Modalities: the two the generator renders (BF, PC) and any other one a user names.

``data.modality`` is ``bf``, ``pc``, ``other``, or a name of the user's own (``dic``,
``fluorescence``, ``bf2``: lower-case letters and digits). The synthetic generator has settings
for BF and PC only. For any other modality the synthetic twin takes the settings named by
``data.synthetic_generator.modality`` when given, else those of the generator modality whose
rendering looks closest to the natural training images (`closest_generator_modality`): closest
in mean grey level and contrast (the mean over images of each image's standard deviation of
grey values), by Euclidean distance in grey levels. The mean grey level tells a bright
background (BF) from a dark one (PC, fluorescence); the contrast tells how strongly the cells
stand out of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from twinvae.data.imageset import Modality
from twinvae.errors import ConfigError

GENERATOR_MODALITIES: tuple[Modality, ...] = ("bf", "pc")
"""The modalities the synthetic generator has settings for."""
OTHER_MODALITY = "other"
MODALITY_PATTERN = r"^[a-z][a-z0-9]{0,31}$"
"""What a modality name may be: bf, pc, other, or e.g. dic, fluorescence."""
MODALITY_NAMES: dict[str, str] = {"bf": "bright-field", "pc": "phase-contrast"}
LOOK_IMAGES = 64
"""Generated images per generator modality that a natural set's look is compared with."""


def modality_name(modality: str) -> str:
    """Words for a modality: 'bright-field', 'phase-contrast', 'unnamed modality', 'dic'."""
    if modality == OTHER_MODALITY:
        return "unnamed modality"
    return MODALITY_NAMES.get(modality, modality)


def generator_modality(modality: str | None) -> Modality | None:
    """``modality`` when the generator has settings for it (bf, pc), else None."""
    if modality == "bf":
        return "bf"
    if modality == "pc":
        return "pc"
    return None


def settings_modality(modality: str, generator_overrides: Mapping[str, Any]) -> Modality | None:
    """The generator modality of a run's synthetic images: ``synthetic_generator.modality``
    when given, else the run's modality when it is bf or pc, else None (not chosen yet)."""
    given = generator_overrides.get("modality")
    if given is not None:
        chosen = generator_modality(str(given))
        if chosen is None:
            raise ConfigError(
                f"data.synthetic_generator.modality {given!r}: the generator has settings for "
                f"{' and '.join(GENERATOR_MODALITIES)} only"
            )
        return chosen
    return generator_modality(modality)


def no_settings_message(modality: str) -> str:
    """Why a modality without generator settings needs a choice, and how to make it."""
    return (
        f"data.modality {modality!r}: the synthetic generator has settings for "
        f"{' and '.join(GENERATOR_MODALITIES)} only, and there are no natural images "
        "(data.natural) to choose the closer one by; set data.synthetic_generator.modality=bf "
        "or =pc"
    )


@dataclass(frozen=True)
class Look:
    """Mean grey level and contrast (mean per-image grey-value std) of images, in 0..255."""

    mean: float
    contrast: float

    def distance(self, other: Look) -> float:
        return math.hypot(self.mean - other.mean, self.contrast - other.contrast)

    def describe(self) -> str:
        return f"mean grey {self.mean:.1f}, contrast {self.contrast:.1f}"


def image_look(images: np.ndarray) -> Look:
    """The `Look` of uint8 images (N, H, W)."""
    values = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    return Look(mean=float(values.mean()), contrast=float(values.std(axis=1).mean()))


@dataclass(frozen=True)
class LookChoice:
    """Which generator settings a modality without its own gets, and why."""

    modality: Modality
    natural: Look
    rendered: dict[str, Look]

    def describe(self) -> str:
        rendered = "; ".join(
            f"the generator's {name.upper()} rendering {look.describe()}"
            for name, look in self.rendered.items()
        )
        return (
            f"the natural training images have {self.natural.describe()}; {rendered}: "
            f"{self.modality.upper()} is closer"
        )


def rendered_look(modality: Modality, count: int = LOOK_IMAGES, seed: int = 0) -> Look:
    """The `Look` of the generator's synthetic images of a modality (flat background)."""
    from twinvae.data.synthetic import SynthConfig, generate

    return image_look(generate(SynthConfig.for_modality(modality), count, seed=seed).images)


def closest_generator_modality(natural_images: np.ndarray) -> LookChoice:
    """The generator modality whose rendering is closest in mean grey level and contrast."""
    if len(natural_images) == 0:
        raise ConfigError("no natural images to compare the generator's modalities with")
    natural = image_look(natural_images)
    rendered: dict[str, Look] = {
        modality: rendered_look(modality) for modality in GENERATOR_MODALITIES
    }
    chosen = min(GENERATOR_MODALITIES, key=lambda modality: natural.distance(rendered[modality]))
    return LookChoice(modality=chosen, natural=natural, rendered=rendered)
