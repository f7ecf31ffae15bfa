"""Test helpers for the experiment tests: a tiny fake CHO-K1 tree of generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from twinvae.data.synthetic import SynthConfig, generate


def write_fake_cho_k1(
    root: Path,
    modality: str = "pc",
    *,
    train_chambers: int = 3,
    frames: int = 8,
    test_chambers: int = 2,
    test_frames: int = 4,
    seed: int = 0,
) -> Path:
    """Natural-style generated images in the CHO-K1 layout <root>/<modality>/{train,test}.csv.

    Names follow the microscope export pattern (nd001_cropxy01t001c1.png), so chamber splits
    work; odd frames are labelled, even ones unlabelled (count 0). Test chambers reuse train
    chamber numbers, as in the real data.
    """
    total = train_chambers * frames + test_chambers * test_frames
    images = generate(
        SynthConfig.for_modality(modality, style="natural"),  # type: ignore[arg-type]
        total,
        seed=seed,
    )
    folder = root / modality
    index = 0
    for split, chambers, n_frames in (
        ("train", train_chambers, frames),
        ("test", test_chambers, test_frames),
    ):
        rows = []
        for chamber in range(1, chambers + 1):
            for frame in range(1, n_frames + 1):
                name = f"{split}/nd001_cropxy{chamber:02d}t{frame:03d}c1.png"
                path = folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images.images[index]).save(path)
                count = int(images.counts[index]) if frame % 2 == 1 else 0
                rows.append(f"{name},{count}")
                index += 1
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def render_cells(
    centres: list[tuple[int, int]], modality: str, radius: float = 7.0, walls: bool = False
) -> np.ndarray:
    """A 128x128 image of round cells at known centres, BF or PC style, with mild noise.

    BF: light background, bright fill, dark rim. PC: dark background, dark fill, bright halo.
    ``walls`` draws a chamber outline (a thin rectangle in the rim colour) around them.
    """
    background, fill, rim = (190, 200, 100) if modality == "bf" else (56, 52, 190)
    yy, xx = np.mgrid[0:128, 0:128]
    image = np.full((128, 128), float(background))
    for cy, cx in centres:
        distance = np.hypot(yy - cy, xx - cx)
        image[distance <= radius] = fill
        image[(distance > radius - 1.5) & (distance <= radius + 0.5)] = rim
    if walls:
        for line in (6, 7):
            image[line, 6:122] = rim
            image[121 - (line - 6), 6:122] = rim
            image[6:122, line] = rim
            image[6:122, 121 - (line - 6)] = rim
    image += np.random.default_rng(0).normal(0.0, 2.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
