"""Training data: natural train/validation split, synthetic source, and batch sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twinvae.config import DataConfig
from twinvae.data.imageset import ImageSet
from twinvae.data.synthetic import SynthConfig
from twinvae.errors import DataError


@dataclass
class TrainingData:
    """Natural train + validation sets and the synthetic source (a set, or on the fly)."""

    natural_train: ImageSet
    natural_val: ImageSet
    synthetic: ImageSet | None
    synthetic_val: ImageSet | None
    synthetic_background: np.ndarray | None = None


def with_paths_from(data: DataConfig, base: Path) -> DataConfig:
    """``data`` with its relative paths (images, synthetic set, cache, background file) made
    absolute against ``base``, the folder the run started in: a resume from elsewhere then
    reads the same files."""

    def absolute(value: str | None) -> str | None:
        if value is None or Path(value).expanduser().is_absolute():
            return value
        return str(base / value)

    background = data.synthetic_background
    return data.model_copy(
        update={
            "natural": absolute(data.natural),
            "synthetic": absolute(data.synthetic),
            "cache_dir": absolute(data.cache_dir),
            "synthetic_background": (
                background if background in ("flat", "natural-mean") else absolute(background)
            ),
        }
    )


def synth_config(data: DataConfig, style: str = "synthetic") -> SynthConfig:
    """The generator config of this run (modality defaults + user overrides)."""
    overrides = {**data.synthetic_generator, "style": style}
    return SynthConfig.for_modality(data.modality, **overrides)


def generated_natural_set(data: DataConfig, seed: int) -> ImageSet:
    """Generated natural-looking images; the first ``generated_natural_labelled`` keep labels."""
    from twinvae.data.synthetic import generate

    images = generate(synth_config(data, "natural"), data.generated_natural_count, seed=seed + 101)
    counts = images.counts.copy()
    counts[data.generated_natural_labelled :] = 0
    images.counts = counts
    return images


def load_natural(data: DataConfig, seed: int) -> ImageSet:
    if data.natural is None:
        return generated_natural_set(data, seed)
    from twinvae.data.readers import load_image_set

    cache_dir = Path(data.cache_dir) if data.cache_dir else None
    return load_image_set(
        Path(data.natural),
        split=data.natural_split,
        modality=data.modality,
        skip_bad=data.skip_bad,
        resize=data.resize,
        max_count=data.max_count,
        cache_dir=cache_dir,
    )


def prepare_data(data: DataConfig, seed: int) -> TrainingData:
    """Load natural images, cut validation by chamber, and set up the synthetic source."""
    from twinvae.data.readers import detect_layout
    from twinvae.data.splits import GroupBy, choose_group_by, split_by_chamber

    natural = load_natural(data, seed)
    group_by: GroupBy = "file"  # generated natural images have no chambers
    if data.natural is not None:
        generic = detect_layout(Path(data.natural)) == "folder"
        group_by = choose_group_by(
            natural.names, data.split_by, generic_folder=generic, source=data.natural
        )
    train, val = split_by_chamber(
        natural, val_fraction=data.val_fraction, seed=data.split_seed, group_by=group_by
    )
    if not val.labelled.any():
        raise DataError(f"{data.natural}: the validation split holds no labelled image")
    synthetic: ImageSet | None = None
    synthetic_val: ImageSet | None = None
    background: np.ndarray | None = None
    if not data.natural_only:
        from twinvae.data.synthetic import generate

        background = synthetic_background(data, train)
        synthetic_val = generate(synth_config(data), 256, seed=seed + 7919, background=background)
        if data.synthetic is not None:
            from twinvae.data.readers import read_image_folder

            synthetic = read_image_folder(Path(data.synthetic), max_count=data.max_count)
            if not synthetic.labelled.all():
                raise DataError(f"{data.synthetic}: every synthetic image needs a count")
    return TrainingData(train, val, synthetic, synthetic_val, background)


def synthetic_background(data: DataConfig, natural_train: ImageSet) -> np.ndarray | None:
    """The generator background chosen by ``data.synthetic_background`` (None = flat)."""
    from twinvae.data.synthetic import background_from_natural, load_background

    choice = data.synthetic_background
    if choice == "flat" or (choice == "natural-mean" and data.natural is None):
        return None
    if choice == "natural-mean":
        few_cells = natural_train.labelled & (natural_train.counts < 5)
        return background_from_natural(natural_train) if few_cells.any() else None
    return load_background(Path(choice))


class NaturalSampler:
    """Draws natural batches with a fixed share of labelled images (labels are scarce)."""

    def __init__(self, images: ImageSet, labelled_fraction: float | None) -> None:
        self.labelled_index = np.flatnonzero(images.labelled)
        self.unlabelled_index = np.flatnonzero(~images.labelled)
        self.all_index = np.arange(len(images))
        self.labelled_fraction = labelled_fraction
        if len(self.labelled_index) == 0:
            raise DataError(f"{images.source or 'natural set'}: no labelled training image")

    def sample(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        if self.labelled_fraction is None or len(self.unlabelled_index) == 0:
            return rng.choice(
                self.all_index, size=batch_size, replace=len(self.all_index) < batch_size
            )
        n_labelled = max(1, round(batch_size * self.labelled_fraction))
        labelled = rng.choice(self.labelled_index, size=n_labelled, replace=True)
        unlabelled = rng.choice(
            self.unlabelled_index,
            size=batch_size - n_labelled,
            replace=len(self.unlabelled_index) < batch_size - n_labelled,
        )
        return np.concatenate([labelled, unlabelled])


class SyntheticSource:
    """Synthetic batches from a stored set, or generated on the fly from (seed, epoch, step)."""

    def __init__(
        self,
        data: DataConfig,
        stored: ImageSet | None,
        seed: int,
        background: np.ndarray | None = None,
    ) -> None:
        self.stored = stored
        self.seed = seed
        self.background = background
        self.config = synth_config(data)

    def batch(
        self, size: int, key: tuple[int, ...], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``key`` (epoch, step, rank) fixes the generated batch; stored sets use ``rng``."""
        if self.stored is not None:
            index = rng.integers(0, len(self.stored), size=size)
            return self.stored.images[index], self.stored.counts[index]
        from twinvae.data.synthetic import generate

        batch_seed = int(np.random.SeedSequence([self.seed, *key]).generate_state(1)[0])
        generated = generate(self.config, size, seed=batch_seed, background=self.background)
        return generated.images, generated.counts


def to_tensor(images: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1] on the device (pinned copy on CUDA)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    tensor = tensor.float().div_(255.0)
    if channels_last:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor
