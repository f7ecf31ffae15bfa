"""The in-memory image set every reader and the generator produce."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Domain = Literal["natural", "synthetic"]
Modality = Literal["bf", "pc"]

IMAGE_SIZE = 128
MAX_COUNT = 30


@dataclass
class ImageSet:
    """Decoded grey images with their counts.

    images: (N, H, W) uint8, decoded once so that training never touches files per epoch.
    counts: (N,) int16; 0 means "not labelled" (every labelled image has >= 1 cell).
    names: one relative path (or generated name) per image.
    time_points: (chamber, frame) per image where the data listed them (a `chamber,frame` column
    pair in counts.csv), None per image or for the whole set = tell them from the file name.
    """

    images: np.ndarray
    counts: np.ndarray
    names: list[str]
    domain: Domain = "natural"
    modality: Modality | None = None
    source: str = ""
    skipped: list[str] = field(default_factory=list)
    time_points: list[tuple[str, int] | None] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 3:
            raise ValueError(
                f"images must be (N, H, W) uint8, got {self.images.dtype} {self.images.shape}"
            )
        self.counts = np.asarray(self.counts, dtype=np.int16)
        if self.counts.shape != (len(self.images),) or len(self.names) != len(self.images):
            raise ValueError(
                f"{len(self.images)} images, {self.counts.shape[0]} counts and "
                f"{len(self.names)} names do not match"
            )
        if self.time_points is not None and len(self.time_points) != len(self.images):
            raise ValueError(f"{len(self.time_points)} time points for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of labelled images (count > 0)."""
        return self.counts > 0

    def subset(self, selection: np.ndarray) -> ImageSet:
        """A new set holding the images picked by a boolean mask or an index array."""
        index = np.flatnonzero(selection) if selection.dtype == bool else np.asarray(selection)
        return ImageSet(
            images=self.images[index],
            counts=self.counts[index],
            names=[self.names[i] for i in index],
            domain=self.domain,
            modality=self.modality,
            source=self.source,
            time_points=None if self.time_points is None else [self.time_points[i] for i in index],
        )

    def labelled_only(self) -> ImageSet:
        return self.subset(self.labelled)

    def unlabelled_only(self) -> ImageSet:
        return self.subset(~self.labelled)

    @staticmethod
    def concatenate(sets: list[ImageSet]) -> ImageSet:
        if not sets:
            raise ValueError("cannot concatenate an empty list of image sets")
        return ImageSet(
            images=np.concatenate([s.images for s in sets]),
            counts=np.concatenate([s.counts for s in sets]),
            names=[n for s in sets for n in s.names],
            domain=sets[0].domain,
            modality=sets[0].modality,
            source="+".join(s.source for s in sets if s.source),
            time_points=None
            if all(s.time_points is None for s in sets)
            else [p for s in sets for p in (s.time_points or [None] * len(s))],
        )
