"""Training data: natural train/validation split, synthetic source, and batch sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twinvae.config import DataConfig, PseudoLabelConfig
from twinvae.data.imageset import ImageSet
from twinvae.data.modality import generator_modality, no_settings_message, settings_modality
from twinvae.data.synthetic import SynthConfig
from twinvae.errors import ConfigError, DataError
from twinvae.training.data_choices import with_generator_look, with_label_budget


@dataclass
class TrainingData:
    """Natural train + validation sets and the synthetic source (a set, or on the fly)."""

    natural_train: ImageSet
    natural_val: ImageSet
    synthetic: ImageSet | None
    synthetic_val: ImageSet | None
    synthetic_background: np.ndarray | None = None
    # regression targets and loss weights of the natural training images when some unlabelled
    # ones carry pseudo-labels (target 0 = none); None = the counts, every label weight 1
    natural_targets: np.ndarray | None = None
    natural_weights: np.ndarray | None = None
    # the data config with the choices prepare_data made (the generator modality of a modality
    # without generator settings: training.data_choices), None when it made none
    data_config: DataConfig | None = None


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
    """The generator config of this run (modality defaults + user overrides); for modalities
    without generator settings those of ``synthetic_generator.modality`` (bf or pc)."""
    look = settings_modality(data.modality, data.synthetic_generator)
    if look is None:
        raise ConfigError(no_settings_message(data.modality))
    overrides = {**data.synthetic_generator, "style": style}
    overrides.pop("modality", None)
    return SynthConfig.for_modality(look, **overrides)


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
        modality=generator_modality(data.modality),  # readers know bf and pc folders only
        skip_bad=data.skip_bad,
        resize=data.resize,
        max_count=data.max_count,
        cache_dir=cache_dir,
    )


def prepare_data(data: DataConfig, seed: int) -> TrainingData:
    """Load natural images, cut validation by chamber, and set up the synthetic source."""
    from twinvae.data.readers import detect_layout
    from twinvae.data.splits import GroupBy, choose_group_by, split_by_chamber

    natural = with_label_budget(data, load_natural(data, seed))
    if data.chamber_background != "off":
        natural = chamber_normalised(natural, data.chamber_background)
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
    given = data
    data = with_generator_look(data, train)
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
    targets: np.ndarray | None = None
    weights: np.ndarray | None = None
    if data.pseudo_labels is not None:  # training chambers only: val was cut off above
        targets, weights = pseudo_label_targets(train, data.pseudo_labels)
    return TrainingData(
        train,
        val,
        synthetic,
        synthetic_val,
        background,
        targets,
        weights,
        data_config=None if data is given else data,
    )


def _chamber_frames(images: ImageSet, option: str) -> list[tuple[str, int]]:
    """(chamber, frame) of every image; an error naming ``option`` when one has none."""
    from twinvae.data.splits import image_time_points

    points = image_time_points(images)
    missing = [name for name, point in zip(images.names, points, strict=True) if point is None]
    if missing:
        raise DataError(
            f"{images.source or 'natural set'}: {option} needs each image's chamber and frame, "
            f"but {missing[0]!r} (and {len(missing) - 1} more) names none; use microscope export "
            "names (<experiment>xy<position>t<frame>c1) or a counts.csv with chamber,frame "
            f"columns, or switch {option} off"
        )
    return [point for point in points if point is not None]


def pseudo_label_targets(
    images: ImageSet, config: PseudoLabelConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Regression targets and loss weights: labelled images keep their count (weight 1); an
    unlabelled frame between two labelled frames of its chamber at most ``max_gap`` frames
    apart gets the count interpolated linearly in time, with a weight falling from ``weight``
    beside a label to ``weight / 2`` midway; other images keep target 0 (not labelled)."""
    points = _chamber_frames(images, "data.pseudo_labels")
    targets = images.counts.astype(np.float32)
    weights = images.labelled.astype(np.float32)
    by_chamber: dict[str, list[int]] = {}
    for index, (chamber, _) in enumerate(points):
        by_chamber.setdefault(chamber, []).append(index)
    for members in by_chamber.values():
        frames = np.array([points[i][1] for i in members])
        counts = images.counts[members].astype(np.float32)
        labelled = counts > 0
        label_frames, label_counts = frames[labelled], counts[labelled]
        order = np.argsort(label_frames, kind="stable")
        label_frames, label_counts = label_frames[order], label_counts[order]
        if len(label_frames) < 2:
            continue
        for index, frame in zip(members, frames, strict=True):
            if images.counts[index] > 0:
                continue
            after = int(np.searchsorted(label_frames, frame, side="right"))
            if after == 0 or after == len(label_frames):
                continue  # before the first or after the last label: no extrapolation
            start, end = label_frames[after - 1], label_frames[after]
            gap = end - start
            if gap > config.max_gap or gap == 0:
                continue
            share = (frame - start) / gap
            targets[index] = label_counts[after - 1] + share * (
                label_counts[after] - label_counts[after - 1]
            )
            weights[index] = config.weight * (1.0 - min(share, 1.0 - share))
    return targets, weights


def chamber_normalised(images: ImageSet, mode: str) -> ImageSet:
    """The set with every image's chamber background removed: ``subtract`` takes the chamber's
    per-pixel median over its frames away, ``divide`` divides by it; either way the result is
    brought back to the background's mean grey level and stored as uint8 again. Uses no label,
    so it applies to held-out chambers alike (from their own frames)."""
    if mode not in ("subtract", "divide"):
        raise DataError(f"chamber background mode {mode!r}: expected subtract or divide")
    points = _chamber_frames(images, "data.chamber_background")
    chambers = np.array([chamber for chamber, _ in points])
    normalised = np.empty_like(images.images)
    for chamber in np.unique(chambers):
        members = np.flatnonzero(chambers == chamber)
        frames = images.images[members].astype(np.float32)
        background = np.median(frames, axis=0)
        level = float(background.mean())
        if mode == "subtract":
            result = frames - background + level
        else:  # flat-field: a dim background pixel (0) would blow up, hence the floor of 1
            result = frames / np.maximum(background, 1.0) * level
        normalised[members] = np.clip(np.rint(result), 0, 255).astype(np.uint8)
    return ImageSet(
        images=normalised,
        counts=images.counts,
        names=images.names,
        domain=images.domain,
        modality=images.modality,
        source=images.source,
        skipped=images.skipped,
        time_points=images.time_points,
    )


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
    """Draws natural batches with a fixed share of labelled images (labels are scarce).

    ``targets`` (pseudo-labels included; 0 = none) decide what counts as labelled, else the
    counts; with ``balance_counts`` labelled images are drawn with probability 1 / (number of
    labelled images with the same rounded target), so rare counts come as often as common ones.
    """

    def __init__(
        self,
        images: ImageSet,
        labelled_fraction: float | None,
        *,
        targets: np.ndarray | None = None,
        balance_counts: bool = False,
    ) -> None:
        labelled = images.labelled if targets is None else targets > 0
        self.labelled_index = np.flatnonzero(labelled)
        self.unlabelled_index = np.flatnonzero(~labelled)
        self.all_index = np.arange(len(images))
        self.labelled_fraction = labelled_fraction
        if len(self.labelled_index) == 0:
            raise DataError(f"{images.source or 'natural set'}: no labelled training image")
        self.labelled_probability: np.ndarray | None = None
        if balance_counts:
            values = images.counts if targets is None else targets
            rounded = np.rint(values[self.labelled_index]).astype(np.int64)
            _, inverse, frequency = np.unique(rounded, return_inverse=True, return_counts=True)
            probability = 1.0 / frequency[inverse]
            self.labelled_probability = probability / probability.sum()

    def sample(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        if self.labelled_probability is None and (
            self.labelled_fraction is None or len(self.unlabelled_index) == 0
        ):
            return rng.choice(
                self.all_index, size=batch_size, replace=len(self.all_index) < batch_size
            )
        fraction = self.labelled_fraction
        if fraction is None:  # balanced, otherwise as sampled: the set's own labelled share
            fraction = len(self.labelled_index) / len(self.all_index)
        n_labelled = max(1, round(batch_size * fraction))
        if len(self.unlabelled_index) == 0:
            n_labelled = batch_size
        labelled = rng.choice(
            self.labelled_index, size=n_labelled, replace=True, p=self.labelled_probability
        )
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
