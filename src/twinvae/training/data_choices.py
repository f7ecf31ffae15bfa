"""Choices prepare_data makes about the natural images: the label budget and, for modalities
the generator has no settings for, which of its modalities the synthetic twin imitates.

Both are said in a TwinVAEWarning (which images, which settings and why), and the generator
choice is written into the run's config (``data.synthetic_generator.modality``), so that a
resume, an export and the bundle's README use the same.
"""

from __future__ import annotations

import warnings

from twinvae.config import DataConfig
from twinvae.data.budget import apply_label_budget
from twinvae.data.imageset import ImageSet
from twinvae.data.modality import closest_generator_modality, settings_modality
from twinvae.errors import TwinVAEWarning


def with_label_budget(data: DataConfig, natural: ImageSet) -> ImageSet:
    """``natural`` with only ``data.label_budget`` labels (seeded by ``split_seed``)."""
    if data.label_budget is None:
        return natural
    result = apply_label_budget(natural, data.label_budget, data.label_chambers, data.split_seed)
    warnings.warn(
        TwinVAEWarning(f"{data.natural or 'natural images'}: {result.describe()}"), stacklevel=3
    )
    return result.images


def with_generator_look(data: DataConfig, natural_train: ImageSet) -> DataConfig:
    """``data`` with ``synthetic_generator.modality`` set when the modality is neither bf nor
    pc and none was given: the generator modality closest to the natural training images."""
    if settings_modality(data.modality, data.synthetic_generator) is not None:
        return data
    choice = closest_generator_modality(natural_train.images)
    warnings.warn(
        TwinVAEWarning(
            f"data.modality {data.modality!r} has no generator settings of its own: the "
            f"synthetic twin uses the generator's {choice.modality.upper()} settings, because "
            f"{choice.describe()}. To choose yourself, set "
            "data.synthetic_generator.modality=bf or =pc (other data.synthetic_generator keys "
            "change single settings)"
        ),
        stacklevel=3,
    )
    generator = {**data.synthetic_generator, "modality": choice.modality}
    return data.model_copy(update={"synthetic_generator": generator})
