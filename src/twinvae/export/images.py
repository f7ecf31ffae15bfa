"""Images the export tests the bundle on: real labelled ones when given, else generated ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twinvae.data.imageset import IMAGE_SIZE, ImageSet, Modality
from twinvae.data.modality import generator_modality
from twinvae.errors import DataError

INPUT_GAIN = 1.0 / 255.0
"""Preprocessing gain: raw 8-bit grey values (0..255) -> the [0, 1] images the model saw."""


@dataclass
class CheckImages:
    """uint8 images (N, 128, 128); the first one becomes the bundle's test input."""

    images: np.ndarray
    counts: np.ndarray
    names: list[str]
    origin: str
    generated: bool

    def __len__(self) -> int:
        return len(self.images)


def to_model_space(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or raw float (N, 1, H, W) 0..255 -> float32 (N, 1, H, W) in [0, 1]."""
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 3:
        array = array[:, None]
    return array * np.float32(INPUT_GAIN)


def _pick(image_set: ImageSet, count: int) -> np.ndarray:
    """Indices: labelled images first (evenly spread by name), the median count one first."""
    order = np.argsort(np.asarray(image_set.names, dtype=object), kind="stable")
    labelled = [i for i in order if image_set.counts[i] > 0]
    unlabelled = [i for i in order if image_set.counts[i] <= 0]
    pool = labelled if labelled else unlabelled
    if len(pool) > count:
        pool = [pool[int(k)] for k in np.linspace(0, len(pool) - 1, count).round()]
    chosen = list(dict.fromkeys(pool))
    if len(chosen) < count:
        chosen += [i for i in unlabelled if i not in chosen][: count - len(chosen)]
    if labelled:
        counts = np.array([image_set.counts[i] for i in chosen])
        median = int(np.argmin(np.abs(counts - np.median(counts[counts > 0]))))
        chosen.insert(0, chosen.pop(median))
    return np.array(chosen, dtype=int)


def from_image_set(image_set: ImageSet, count: int, origin: str, generated: bool) -> CheckImages:
    """Pick up to `count` images of a set (128 x 128 required)."""
    if len(image_set) == 0:
        raise DataError(f"{origin}: no images to test the bundle on")
    if image_set.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{origin}: images are {image_set.images.shape[1]}x{image_set.images.shape[2]}, "
            f"the model takes {IMAGE_SIZE}x{IMAGE_SIZE} (resize them when reading)"
        )
    index = _pick(image_set, count)
    return CheckImages(
        images=np.ascontiguousarray(image_set.images[index]),
        counts=image_set.counts[index].astype(int),
        names=[image_set.names[i] for i in index],
        origin=origin,
        generated=generated,
    )


def load_check_images(
    data: Path | None,
    modality: str,
    count: int = 16,
    seed: int = 0,
    look: Modality | None = None,
) -> CheckImages:
    """Real images from `data` (any layout the readers accept; the test split of CHO-K1
    folders), otherwise natural-style generated images of the modality: of the generator
    modality ``look`` (default: ``modality`` itself, when it is bf or pc)."""
    if count < 1:
        raise ValueError("count must be >= 1")
    if data is not None:
        from twinvae.data.readers import load_image_set

        image_set = load_image_set(data, split="test", modality=generator_modality(modality))
        return from_image_set(image_set, count, origin=str(data), generated=False)
    from twinvae.data.synthetic import SynthConfig, generate

    style = look or generator_modality(modality)
    if style is None:
        raise DataError(
            f"modality {modality!r}: the generator has no settings to make check images with; "
            "give labelled images of it (--data)"
        )
    generated = generate(SynthConfig.for_modality(style, style="natural"), count, seed)
    origin = f"{count} generated natural-style {style.upper()} images (seed {seed})"
    return from_image_set(generated, count, origin=origin, generated=True)


def save_check_images(path: Path, images: CheckImages) -> None:
    """Store check images as .npz (uint8 images, counts, names, origin; no pickle)."""
    with path.open("wb") as stream:
        np.savez_compressed(
            stream,
            images=images.images,
            counts=np.asarray(images.counts, dtype=np.int16),
            names=np.asarray(images.names, dtype=str),
            origin=np.asarray(images.origin, dtype=str),
            generated=np.asarray(images.generated),
        )


def read_check_images(path: Path) -> CheckImages:
    """Check images stored by save_check_images."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            images = CheckImages(
                images=np.asarray(stored["images"], dtype=np.uint8),
                counts=np.asarray(stored["counts"], dtype=int),
                names=[str(name) for name in stored["names"]],
                origin=str(stored["origin"]),
                generated=bool(stored["generated"]),
            )
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"{path}: not a readable check-image file ({error})") from None
    if images.images.ndim != 3 or images.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: images must be (N, {IMAGE_SIZE}, {IMAGE_SIZE})")
    return images
