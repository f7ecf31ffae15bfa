"""Data for the fine-tuning tests: a tiny Twin-VAE and a generic folder with a few labels."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from twinvae.data.synthetic import SynthConfig, generate
from twinvae.models.twin_vae import ModelConfig

TINY = ModelConfig(base_channels=4, latent_dim=8, regressor_hidden=(8,), standardize_input=True)


def write_labelled_folder(folder: Path, modality: str = "pc", labelled: int = 10) -> Path:
    """A generic image folder: 40 generated natural-style images of 4 chambers (microscope
    export names), the first `labelled` of them with their count in counts.csv."""
    folder.mkdir(parents=True)
    images = generate(SynthConfig.for_modality(modality, style="natural"), 40, seed=3)  # type: ignore[arg-type]
    rows = ["filename,count"]
    for index, (image, count) in enumerate(zip(images.images, images.counts, strict=True)):
        name = f"dicxy{index % 4 + 1:02d}t{index // 4 + 1:03d}c1.png"
        Image.fromarray(image).save(folder / name)
        rows.append(f"{name},{int(count) if index < labelled else 0}")
    (folder / "counts.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder
