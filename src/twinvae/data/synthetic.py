"""Fast, seeded generator of synthetic cell images (paper section 2.2, Stallmann et al. 2021).

Two rendering styles share one geometry model (slightly deformed ellipses at integer centres,
placed by rejection sampling inside the chamber margins):

- "synthetic": the authors' look. A rim of rim luminance around an interior of fill luminance,
  pasted onto a background (the per-pixel mean of natural images with few cells, or flat grey),
  then a Gaussian blur blended 50/50 with the sharp image, then a little noise.
- "natural": a stand-in for real microscope images when no real data is present. Textured cell
  interiors, halos, uneven illumination (gradient, low-frequency waves, vignetting), debris
  specks and signal-dependent noise, so that the two domains really differ.

Speed: everything is vectorised over a chunk of CHUNK_SIZE images. Centres are placed by
rejection sampling one slot at a time for all images at once. Distance fields are computed for
all cells of a chunk together on small square patches (cells grouped by patch size) and pasted
with one fancy assignment per group. The blur is linear, so a synthetic image is its blurred
background (cached per blur strength) plus the blurred cell patches: only pixels near cells are
convolved. Where that does not apply (cells sharing pixels, the natural style) whole images are
blurred with a separable convolution. Noise comes from random bytes.

Seeding: image i belongs to chunk i // CHUNK_SIZE; chunk c draws all its random numbers from
numpy's PCG64 seeded with SeedSequence(seed, spawn_key=(modality, style, c)). A chunk is always
rendered in full, so image i depends only on (config, seed, i, background): the same seed gives
byte-identical images however the work is split into calls, batches or threads. Changing
CHUNK_SIZE changes the sequence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from twinvae.data.imageset import IMAGE_SIZE, MAX_COUNT, ImageSet, Modality
from twinvae.errors import ConfigError, DataError

Style = Literal["synthetic", "natural"]
CountDistribution = Literal["paper", "uniform"]

CHUNK_SIZE = 64
"""Images rendered together from one random stream; part of the definition of the sequence."""

# Per-modality defaults. Grey levels are 0..255, lengths in pixels of a 128x128 image.
# Paper settings: BF fill 180+U{0..29}, rim 80+U{0..49}, radius 3..7, margins l/r/t/b 26/20/12/6,
# no overlap; PC fill 50+U{0..9}, rim 160+U{0..49}, radius 3..9, margins 12/11/11/10, overlap 1.
# Radii are drawn continuously; (2.5, 7.5) is the continuous version of the integers 3..7. For PC
# (2.5, 8.5) = 3..8 matches the authors' reference images (no cell wider than 17 px), i.e. the
# paper's 3..9 with an exclusive upper end. Rim widths were tuned so that the blurred rims have
# the contrast and continuity of the reference images.
# background_grey: flat background when no natural background is given; the mean of the
# per-pixel natural background (labelled CHO-K1 train images with < 5 cells: BF 189.6, PC 55.9).
# For BF it is lighter than the all-image mean 0.71*255 because cells darken BF images.
MODALITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "bf": {
        "fill_luminance": (180, 209),
        "rim_luminance": (80, 129),
        "radius_px": (2.5, 7.5),
        "rim_width_px": 1.2,
        "margins": {"left": 26, "right": 20, "top": 12, "bottom": 6},
        "overlap_px": 0.0,
        "background_grey": 190.0,
        "natural": {
            "fill_offset": 0.0,
            "texture_strength": 12.0,
            "halo_luminance": 22.0,
            "halo_width_px": 1.5,
            "rim_width_px": 1.8,
        },
    },
    "pc": {
        "fill_luminance": (50, 59),
        "rim_luminance": (160, 209),
        "radius_px": (2.5, 8.5),
        "rim_width_px": 1.0,
        "margins": {"left": 12, "right": 11, "top": 11, "bottom": 10},
        "overlap_px": 1.0,
        "background_grey": 56.0,
        "natural": {
            "fill_offset": -14.0,
            "texture_strength": 12.0,
            "halo_luminance": 40.0,
            "halo_width_px": 1.2,
            "rim_width_px": 1.6,
        },
    },
}

_GAP_PX = 0.75
"""Added to each cell's extent when spacing cells: covers the half-diagonal of a pixel, so with
overlap 0 no two cells share or touch a pixel (not even diagonally)."""
_PLACEMENT_CANDIDATES = (8, 16, 64, 256, 1024)
"""Random candidate centres per round; a cell still without room gets a grid search."""
_MIN_RADIUS_PX = 1.0
_PATCH_BLOCK = 64
"""Cells per block when computing distance fields (keeps the temporaries in cache)."""
_FINISH_BLOCK = 8
"""Images per block for blur, noise and quantisation."""
_SIGMA_LEVELS = 16
"""Blur strengths are drawn from this many evenly spaced values (blurred backgrounds cached)."""
_MODALITY_KEYS = {"bf": 0, "pc": 1}
_STYLE_KEYS = {"synthetic": 0, "natural": 1}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Margins(_Strict):
    """Pixels at each image border that cells keep free (the chamber walls)."""

    left: int = Field(26, ge=0)
    right: int = Field(20, ge=0)
    top: int = Field(12, ge=0)
    bottom: int = Field(6, ge=0)


class NaturalLook(_Strict):
    """Extra knobs of the "natural" style (ignored by the "synthetic" style)."""

    fill_offset: float = Field(0.0, description="added to the fill luminance of every cell")
    texture_strength: float = Field(12.0, ge=0, description="std of the granular cell texture")
    halo_luminance: float = Field(22.0, description="signed grey offset just outside each cell")
    halo_width_px: float = Field(1.5, gt=0, le=5, description="decay length of the halo")
    rim_width_px: float = Field(1.8, gt=0, le=5, description="rim width of the cells")
    illumination_variation: float = Field(
        0.06, ge=0, le=0.5, description="relative amplitude of the low-frequency illumination"
    )
    vignetting: float = Field(0.08, ge=0, le=0.5, description="relative darkening of the corners")
    debris_per_image: float = Field(5.0, ge=0, le=100, description="mean number of debris specks")
    shot_noise: float = Field(0.2, ge=0, description="noise std = shot_noise * sqrt(grey level)")


class SynthConfig(_Strict):
    """Settings of the generator.

    Fields not given take the defaults of `modality` from MODALITY_DEFAULTS (the static defaults
    below are the BF ones). Luminances are grey levels 0..255, lengths are pixels.
    """

    modality: Modality = "bf"
    style: Style = "synthetic"
    image_size: int = Field(IMAGE_SIZE, ge=16, le=1024)
    min_count: int = Field(1, ge=1, description="at least 1: count 0 means 'not labelled'")
    max_count: int = Field(MAX_COUNT, ge=1, le=200)
    count_distribution: CountDistribution = Field(
        "paper", description="paper: P(n) falls linearly (36 - n for 1..30); uniform: flat"
    )
    fill_luminance: tuple[int, int] = Field((180, 209), description="inclusive integer range")
    rim_luminance: tuple[int, int] = Field((80, 129), description="inclusive integer range")
    radius_px: tuple[float, float] = Field((2.5, 7.5), description="uniform radius range")
    rim_width_px: float = Field(1.2, gt=0, le=5)
    margins: Margins = Field(default_factory=Margins)
    overlap_px: float = Field(
        0.0, ge=0, description="how far cell outlines may overlap; 0 = cells never touch"
    )
    aspect_ratio_max: float = Field(1.3, ge=1.0, le=3.0, description="max ratio of the axes")
    deformation: float = Field(
        0.05, ge=0, le=0.3, description="relative amplitude of the boundary perturbation"
    )
    cell_luminance_jitter: float = Field(
        0.0, ge=0, le=50, description="std of a grey offset added to fill and rim of each cell"
    )
    blur_sigma: tuple[float, float] = Field(
        (0.75, 1.25), description="per-image Gaussian blur std range (paper: radius 1)"
    )
    blur_blend: float = Field(0.5, ge=0, le=1, description="weight of the blurred image")
    noise_std: tuple[float, float] = Field(
        (0.0, 1.5), description="per-image range of the noise std (grey levels)"
    )
    background_grey: float = Field(190.0, ge=0, le=255)
    natural: NaturalLook = Field(default_factory=NaturalLook)

    @model_validator(mode="before")
    @classmethod
    def _modality_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = MODALITY_DEFAULTS.get(data.get("modality", "bf"))
        if defaults is None:
            return data  # the modality field reports the bad value
        merged = dict(data)
        for key, value in defaults.items():
            if key == "natural" and isinstance(merged.get("natural"), dict):
                merged["natural"] = {**value, **merged["natural"]}
            else:
                merged.setdefault(key, value)
        return merged

    @model_validator(mode="after")
    def _consistent(self) -> SynthConfig:
        for name in ("fill_luminance", "rim_luminance", "radius_px", "blur_sigma", "noise_std"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be a range (low, high) with 0 <= low <= high")
        if self.radius_px[0] < _MIN_RADIUS_PX:
            raise ValueError(f"radius_px must start at >= {_MIN_RADIUS_PX}")
        if self.blur_sigma[1] > 5:
            raise ValueError("blur_sigma must be <= 5")
        if max(self.fill_luminance + self.rim_luminance) > 255:
            raise ValueError("luminances must be <= 255")
        if self.min_count > self.max_count:
            raise ValueError(f"min_count {self.min_count} > max_count {self.max_count}")
        width = self.image_size - self.margins.left - self.margins.right
        height = self.image_size - self.margins.top - self.margins.bottom
        if 2 * self.max_extent_px + 3 > min(width, height):
            raise ValueError(
                f"cells up to {2 * self.max_extent_px:.1f} px wide do not fit between the "
                f"margins ({width} x {height} px free)"
            )
        return self

    def to_yaml(self) -> str:
        """All fields (also the defaulted ones) as YAML; load_synth_config reads it back."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def for_modality(cls, modality: Modality, **overrides: Any) -> SynthConfig:
        """The defaults of one modality, optionally with some fields changed."""
        return cls(modality=modality, **overrides)

    @property
    def max_extent_px(self) -> float:
        """Largest possible distance of a cell pixel from its centre."""
        return self.radius_px[1] * math.sqrt(self.aspect_ratio_max) * (1 + self.deformation)

    def count_probabilities(self) -> np.ndarray:
        """P(n) for n = min_count..max_count."""
        n = np.arange(self.min_count, self.max_count + 1, dtype=np.float64)
        if self.count_distribution == "uniform" or len(n) == 1:
            weights = np.ones_like(n)
        else:
            # The paper's 36 - n on 1..30 (weight 35 falling linearly to 6); other ranges keep
            # this shape.
            weights = 35.0 - 29.0 * (n - n[0]) / (n[-1] - n[0])
        return weights / weights.sum()


def config_from_dict(
    data: dict[str, Any], source: str = "synthetic generator config"
) -> SynthConfig:
    """Validate a dict (e.g. read from YAML) into a SynthConfig; problems become ConfigError."""
    try:
        return SynthConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'config'}: {e['msg']}"
            for e in error.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_synth_config(path: Path | str, **overrides: Any) -> SynthConfig:
    """Read a SynthConfig YAML file (e.g. a saved synth_config.yaml); overrides win."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of generator settings")
    return config_from_dict({**data, **overrides}, str(path))


# --- backgrounds -----------------------------------------------------------------------------


def flat_background(config: SynthConfig) -> np.ndarray:
    """A flat (H, W) float32 background at the modality's background grey."""
    size = config.image_size
    return np.full((size, size), config.background_grey, dtype=np.float32)


def background_from_natural(image_set: ImageSet, max_cells: int = 5) -> np.ndarray:
    """Per-pixel mean (float32 (H, W)) of the labelled images with fewer than max_cells cells."""
    selected = image_set.labelled & (image_set.counts < max_cells)
    if not selected.any():
        raise DataError(
            f"{image_set.source or 'image set'}: no labelled image with fewer than {max_cells} "
            f"cells to average into a background ({int(image_set.labelled.sum())} labelled "
            "images)"
        )
    return image_set.images[selected].mean(axis=0, dtype=np.float64).astype(np.float32)


def load_background(path: Path | str, size: int = IMAGE_SIZE) -> np.ndarray:
    """Read a background image file (PNG/JPEG/TIFF, made grey) as float32 (size, size)."""
    from twinvae.data.readers import read_grey_image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: background image not found")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError):
        width = height = size  # not readable by Pillow: read_grey_image reports the problem
    if (width, height) != (size, size):
        raise DataError(
            f"{path}: background is {width}x{height} pixels; expected {size}x{size} (the image "
            "size of the generated images)"
        )
    return read_grey_image(path, size=size).astype(np.float32)


def _check_background(background: np.ndarray | None, config: SynthConfig) -> np.ndarray:
    if background is None:
        return flat_background(config)
    size = config.image_size
    background = np.asarray(background, dtype=np.float32)
    if background.shape != (size, size):
        raise DataError(
            f"background has shape {background.shape}; expected ({size}, {size}) for "
            f"image_size {size}"
        )
    return background


# --- geometry --------------------------------------------------------------------------------


@dataclass
class CellLayout:
    """Cells of generated images, one entry per cell.

    image: index of the image; x, y: integer centre (x = column); radius: nominal radius;
    extent: bound on the distance of a cell pixel from the centre.
    """

    image: np.ndarray
    x: np.ndarray
    y: np.ndarray
    radius: np.ndarray
    extent: np.ndarray


@dataclass
class _Cells:
    """Cells of one chunk in painting order: slot 0 of every image, then slot 1, ..."""

    layout: CellLayout
    slot_sizes: np.ndarray  # cells per slot
    shape: np.ndarray  # (C, 6): cos/a, sin/a, cos/b, sin/b, 1/a, 1/b (semi-axes a, b; angle)
    harmonics: np.ndarray  # (C, 4): cos/sin weights of the 2nd and 3rd boundary harmonic
    fill: np.ndarray
    rim: np.ndarray


def _sample_counts(config: SynthConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    values = np.arange(config.min_count, config.max_count + 1)
    return rng.choice(values, size=n, p=config.count_probabilities()).astype(np.int64)


def _extent(radius: np.ndarray, log_aspect: np.ndarray, harmonics: np.ndarray) -> np.ndarray:
    """Bound on the distance of a cell pixel from the centre."""
    amplitude = np.hypot(harmonics[..., 0], harmonics[..., 1]) + np.hypot(
        harmonics[..., 2], harmonics[..., 3]
    )
    return radius * np.exp(np.abs(log_aspect) / 2) * (1 + amplitude)


def _sample_cells(config: SynthConfig, rng: np.random.Generator, counts: np.ndarray) -> _Cells:
    """Draw shapes, luminances and positions of every cell of a chunk."""
    n_images, slots = len(counts), int(counts.max())
    shape = (n_images, slots)
    valid = np.arange(slots)[None, :] < counts[:, None]
    # Largest cells of each image first: placing them while the image is still empty lets
    # crowded images pack. Unused slots sort last and get the smallest radius.
    radius = np.where(valid, rng.uniform(*config.radius_px, size=shape), -1.0)
    radius = -np.sort(-radius, axis=1)
    radius[~valid] = config.radius_px[0]
    log_aspect = rng.uniform(-1, 1, size=shape) * math.log(config.aspect_ratio_max)
    theta = rng.uniform(0, math.pi, size=shape)
    amplitude = config.deformation * rng.uniform(0, 1, size=shape)
    share = rng.uniform(0, 1, size=shape)
    phase = rng.uniform(0, 2 * math.pi, size=(2, *shape))
    amp2, amp3 = amplitude * share, amplitude * (1 - share)
    harmonics = np.stack(
        [
            amp2 * np.cos(phase[0]),
            amp2 * np.sin(phase[0]),
            amp3 * np.cos(phase[1]),
            amp3 * np.sin(phase[1]),
        ],
        axis=-1,
    )
    jitter = rng.normal(0, 1, size=shape) * config.cell_luminance_jitter
    fill = rng.integers(config.fill_luminance[0], config.fill_luminance[1] + 1, size=shape) + jitter
    rim = rng.integers(config.rim_luminance[0], config.rim_luminance[1] + 1, size=shape) + jitter
    fill, rim = fill.astype(np.float32), rim.astype(np.float32)
    extent = _extent(radius, log_aspect, harmonics)
    x, y = _place(config, rng, counts, radius, log_aspect, harmonics, extent)
    order = valid.T

    def pick(values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.swapaxes(values, 0, 1)[order])

    radius_c = pick(radius)
    a = radius_c * np.exp(pick(log_aspect) / 2)
    b = radius_c * np.exp(-pick(log_aspect) / 2)
    cos_t, sin_t = pick(np.cos(theta)), pick(np.sin(theta))
    image = np.broadcast_to(np.arange(n_images)[None, :], (slots, n_images))[order]
    return _Cells(
        layout=CellLayout(
            image=np.ascontiguousarray(image),
            x=pick(x),
            y=pick(y),
            radius=radius_c,
            extent=pick(extent),
        ),
        slot_sizes=valid.sum(axis=0),
        shape=np.stack([cos_t / a, sin_t / a, cos_t / b, sin_t / b, 1 / a, 1 / b], axis=1),
        harmonics=pick(harmonics),
        fill=pick(fill),
        rim=pick(rim),
    )


def _centre_range(config: SynthConfig, extent: np.ndarray) -> tuple[np.ndarray, ...]:
    """Lowest and highest integer centre (x and y) keeping a cell inside the margins."""
    size, m = config.image_size, config.margins
    return (
        np.ceil(m.left + extent),
        np.floor(size - 1 - m.right - extent),
        np.ceil(m.top + extent),
        np.floor(size - 1 - m.bottom - extent),
    )


def _place(
    config: SynthConfig,
    rng: np.random.Generator,
    counts: np.ndarray,
    radius: np.ndarray,
    log_aspect: np.ndarray,
    harmonics: np.ndarray,
    extent: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Rejection sampling of integer centres, slot by slot for all images of a chunk at once.

    Centres keep extent1 + extent2 + 2 * _GAP_PX - overlap_px apart and whole cells stay inside
    the margins. A cell that finds no room among the random candidates gets an exhaustive grid
    search (_place_on_grid).
    """
    n_images, slots = radius.shape
    x = np.zeros((n_images, slots))
    y = np.zeros((n_images, slots))
    for slot in range(slots):
        pending = np.flatnonzero(counts > slot)
        # Placed cells of the pending images, as float32 (half the memory traffic).
        placed_x = x[pending, :slot].astype(np.float32)[:, None, :]
        placed_y = y[pending, :slot].astype(np.float32)[:, None, :]
        spacing = (extent[pending, :slot] + 2 * _GAP_PX - config.overlap_px).astype(np.float32)
        for candidates in _PLACEMENT_CANDIDATES:
            e = extent[pending, slot][:, None]
            x_low, x_high, y_low, y_high = _centre_range(config, e)
            u = rng.uniform(0, 1, size=(2, len(pending), candidates))
            cx = x_low + np.floor(u[0] * (x_high - x_low + 1))
            cy = y_low + np.floor(u[1] * (y_high - y_low + 1))
            if slot:
                dx = cx.astype(np.float32)[:, :, None] - placed_x
                dy = cy.astype(np.float32)[:, :, None] - placed_y
                dx *= dx
                dy *= dy
                dx += dy
                needed = spacing + e.astype(np.float32)
                needed *= needed
                ok = (dx >= needed[:, None, :]).all(axis=2)
            else:
                ok = np.ones(cx.shape, dtype=bool)
            found = ok.any(axis=1)
            first = ok.argmax(axis=1)[found]
            done = pending[found]
            x[done, slot] = cx[found, first]
            y[done, slot] = cy[found, first]
            if found.all():
                pending = pending[:0]
                break
            left = ~found
            pending = pending[left]
            placed_x, placed_y, spacing = placed_x[left], placed_y[left], spacing[left]
        for image in pending:
            x[image, slot], y[image, slot] = _place_on_grid(
                config, rng, (int(image), slot), x, y, (radius, log_aspect, harmonics, extent)
            )
    return x, y


def _place_on_grid(
    config: SynthConfig,
    rng: np.random.Generator,
    cell: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    shapes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> tuple[float, float]:
    """A random free integer centre, found by checking every pixel of the chamber.

    If no centre has room for the cell, it goes where the most room is and shrinks to fit
    (radius and extent updated in place)."""
    image, slot = cell
    radius, log_aspect, harmonics, extent = shapes
    size, m = config.image_size, config.margins
    columns = np.arange(m.left, size - m.right, dtype=np.float64)
    rows = np.arange(m.top, size - m.bottom, dtype=np.float64)
    cx = np.tile(columns, len(rows))
    cy = np.repeat(rows, len(columns))
    # Largest extent a cell centred at each point may have (margins, then the placed cells).
    room = np.minimum.reduce(
        [cx - m.left, size - 1 - m.right - cx, cy - m.top, size - 1 - m.bottom - cy]
    )
    if slot:
        distance = np.hypot(
            cx[:, None] - x[image, None, :slot], cy[:, None] - y[image, None, :slot]
        )
        spacing = distance - (extent[image, :slot] + 2 * _GAP_PX - config.overlap_px)
        room = np.minimum(room, spacing.min(axis=1))
    free = np.flatnonzero(room >= extent[image, slot])
    if len(free):
        choice = int(free[rng.integers(len(free))])
    else:
        choice = int(np.argmax(room))
        scale = room[choice] / extent[image, slot] * (1 - 1e-9)
        if radius[image, slot] * scale < _MIN_RADIUS_PX:
            raise ConfigError(
                f"could not place {slot + 1} cells of radius {config.radius_px} px with overlap "
                f"{config.overlap_px} px between the margins of a {size}x{size} image; lower "
                "max_count or radius_px, or raise overlap_px"
            )
        radius[image, slot] *= scale
        extent[image, slot] = _extent(
            radius[image, slot], log_aspect[image, slot], harmonics[image, slot]
        )
    return float(cx[choice]), float(cy[choice])


# --- distance fields on patches ----------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """A (2h+1)^2 patch around an integer centre, flattened: offsets and angular harmonics."""

    half: int
    dx: np.ndarray  # float32 (Q,)
    dy: np.ndarray
    harmonics: np.ndarray  # float32 (4, Q): cos 2phi, sin 2phi, cos 3phi, sin 3phi
    flat_offset: np.ndarray  # int64 (Q,): offset in a flattened image


@functools.lru_cache(maxsize=64)
def _grid(half: int, size: int) -> _Grid:
    offsets = np.arange(-half, half + 1)
    dx = np.tile(offsets, len(offsets))
    dy = np.repeat(offsets, len(offsets))
    phi = np.arctan2(dy, dx)
    harmonics = np.stack([np.cos(2 * phi), np.sin(2 * phi), np.cos(3 * phi), np.sin(3 * phi)])
    grid = _Grid(
        half=half,
        dx=dx.astype(np.float32),
        dy=dy.astype(np.float32),
        harmonics=harmonics.astype(np.float32),
        flat_offset=(dy * size + dx).astype(np.int64),
    )
    for array in (grid.dx, grid.dy, grid.harmonics, grid.flat_offset):
        array.setflags(write=False)  # shared between threads through the cache
    return grid


@dataclass
class _Group:
    """Distance fields of the cells whose patches share one size."""

    cells: np.ndarray  # indices into the chunk's cells, ascending (= painting order)
    grid: _Grid
    signed: np.ndarray  # float32 (Cg, Q): distance to the boundary in px, <= 0 inside
    rho: np.ndarray  # float32 (Cg, Q): normalised radius, 1 on the unperturbed ellipse
    centre: np.ndarray  # int64 (Cg,): flat index of each patch centre in the chunk canvas


def _patch_groups(config: SynthConfig, cells: _Cells, pad: int) -> list[_Group]:
    """Distance fields of all cells of a chunk, grouped by patch size."""
    layout = cells.layout
    size = config.image_size
    # Patch half-widths rounded up to even numbers: few groups, little wasted area.
    half = 2 * np.ceil((np.floor(layout.extent) + pad) / 2).astype(np.int64)
    centre = (
        layout.image * (size * size) + layout.y.astype(np.int64) * size + layout.x.astype(np.int64)
    )
    shape = cells.shape.astype(np.float32)
    harmonics = cells.harmonics.astype(np.float32)
    groups = []
    for value in np.unique(half):
        members = np.flatnonzero(half == value)
        grid = _grid(int(value), size)
        signed = np.empty((len(members), len(grid.dx)), dtype=np.float32)
        rho = np.empty_like(signed)
        for start in range(0, len(members), _PATCH_BLOCK):
            block = members[start : start + _PATCH_BLOCK]
            rows = slice(start, start + len(block))
            _distance_field(grid, shape[block], harmonics[block], signed[rows], rho[rows])
        groups.append(_Group(members, grid, signed, rho, centre[members]))
    return groups


def _distance_field(
    grid: _Grid,
    shape: np.ndarray,
    harmonics: np.ndarray,
    signed: np.ndarray,
    rho: np.ndarray,
) -> None:
    """Fill signed (px) and rho for a block of cells; in-place arithmetic keeps it fast.

    rho is the normalised elliptic radius; the distance to the boundary is (rho - boundary)
    divided by |grad rho|, so rims have the same width along both axes."""
    cos_a, sin_a, cos_b, sin_b, inv_a, inv_b = (shape[:, k, None] for k in range(6))
    u = grid.dx * cos_a  # coordinates along the axes, divided by the semi-axes
    u += grid.dy * sin_a
    v = grid.dy * cos_b
    v -= grid.dx * sin_b
    np.multiply(u, u, out=rho)
    rho += v * v
    np.sqrt(rho, out=rho)
    u *= inv_a  # |grad rho| = |(u / a, v / b)| / rho
    v *= inv_b
    np.multiply(u, u, out=u)
    np.multiply(v, v, out=v)
    u += v
    np.sqrt(u, out=u)
    u += np.float32(1e-6) * inv_a  # centre pixel: 0 / 0 -> 1 / inv_a
    np.add(rho, np.float32(1e-6), out=v)
    v /= u  # 1 / |grad rho|
    boundary = grid.harmonics[0] * harmonics[:, 0, None]
    for k in range(1, 4):
        np.multiply(grid.harmonics[k], harmonics[:, k, None], out=u)
        boundary += u
    boundary += 1
    np.subtract(rho, boundary, out=signed)
    signed *= v


# --- painting ----------------------------------------------------------------------------------

_Part = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Pixels to paint: flat canvas index, value, and the cell each belongs to."""


def _paint_in_order(
    config: SynthConfig, canvas: np.ndarray, cells: _Cells, parts: list[_Part]
) -> None:
    """Assign (flat index, value, cell) parts; where cells share pixels, later slots win."""
    target = canvas.reshape(-1)
    if config.overlap_px < 2 * _GAP_PX:  # cells cannot share a pixel: order does not matter
        for flat, values, _ in parts:
            target[flat] = values
        return
    flat = np.concatenate([part[0] for part in parts])
    values = np.concatenate([part[1] for part in parts])
    cell = np.concatenate([part[2] for part in parts])
    order = np.argsort(cell, kind="stable")
    flat, values, cell = flat[order], values[order], cell[order]
    bounds = np.searchsorted(cell, np.cumsum(cells.slot_sizes)[:-1])
    for chunk_flat, chunk_values in zip(
        np.split(flat, bounds), np.split(values, bounds), strict=True
    ):
        target[chunk_flat] = chunk_values  # one slot: no pixel twice


def _selected(group: _Group, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (cell within group), flat canvas index and signed distance of the masked pixels."""
    rows, cols = np.nonzero(mask)
    flat = group.centre[rows] + group.grid.flat_offset[cols]
    return rows, flat, group.signed[rows, cols]


def _paint_synthetic(config: SynthConfig, canvas: np.ndarray, cells: _Cells) -> None:
    parts: list[_Part] = []
    rim_edge = np.float32(-config.rim_width_px)
    for group in _patch_groups(config, cells, pad=0):
        rows, flat, signed = _selected(group, group.signed <= 0)
        cell = group.cells[rows]
        values = np.where(signed > rim_edge, cells.rim[cell], cells.fill[cell])
        parts.append((flat, values, cell))
    _paint_in_order(config, canvas, cells, parts)


def _granular_texture(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance noise smoothed by [1, 2, 1] along both image axes (granules ~2 px)."""
    noise = _unit_noise(rng, shape)
    smooth = noise * 2
    smooth[:, :, 1:-1] += noise[:, :, 2:] + noise[:, :, :-2]
    texture = smooth * 2
    texture[:, 1:-1, :] += smooth[:, 2:, :] + smooth[:, :-2, :]
    texture *= np.float32(1 / 6)  # 6 = norm of the [1,2,1] x [1,2,1] kernel
    return texture


def _paint_natural(
    config: SynthConfig, canvas: np.ndarray, cells: _Cells, rng: np.random.Generator
) -> None:
    look = config.natural
    size = config.image_size
    reach = 3 * look.halo_width_px
    texture = _granular_texture(rng, canvas.shape).reshape(-1)
    target = canvas.reshape(-1)
    groups = _patch_groups(config, cells, pad=math.ceil(reach))
    parts: list[_Part] = []
    for group in groups:  # halos first (additive), then the cells on top
        rows, flat, signed = _selected(group, (group.signed > 0) & (group.signed <= reach))
        cols = flat % size  # halos may reach past the border: keep those inside the image
        row_in_image = (flat // size) % size
        centre_col = group.centre[rows] % size
        centre_row = (group.centre[rows] // size) % size
        inside = (np.abs(cols - centre_col) <= group.grid.half) & (
            np.abs(row_in_image - centre_row) <= group.grid.half
        )
        halo = np.exp(signed[inside] / np.float32(-look.halo_width_px))
        halo *= np.float32(look.halo_luminance)
        np.add.at(target, flat[inside], halo)
    for group in groups:
        rows, cols = np.nonzero(group.signed <= 0)
        flat = group.centre[rows] + group.grid.flat_offset[cols]
        signed = group.signed[rows, cols]
        rho = group.rho[rows, cols]
        cell = group.cells[rows]
        fill = (cells.fill[cell] + look.fill_offset).astype(np.float32)
        rim = cells.rim[cell].astype(np.float32)
        rim_weight = np.clip(1 + signed / np.float32(look.rim_width_px), 0, 1)
        values = fill + rim_weight * (rim - fill)  # rim fading into the interior
        values += np.float32(0.25) * (fill - rim) * np.clip(1 - rho * rho, 0, 1)  # soft centre
        values += texture[flat] * np.float32(look.texture_strength)
        parts.append((flat, values, cell))
    _paint_in_order(config, canvas, cells, parts)


def _illumination(config: SynthConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, H, W) multiplicative field: gradient, two low-frequency waves and vignetting."""
    look = config.natural
    grid = np.linspace(-1, 1, config.image_size, dtype=np.float32)
    amplitude = look.illumination_variation
    slope = (rng.uniform(-1, 1, size=(2, n, 1)) * amplitude).astype(np.float32)
    vignetting = (rng.uniform(0.5, 1.0, size=(n, 1)) * look.vignetting / 2).astype(np.float32)
    along_x = 1 + slope[0] * grid - vignetting * grid * grid
    along_y = slope[1] * grid - vignetting * grid * grid
    field = along_y[:, :, None] + along_x[:, None, :]
    for _ in range(2):
        frequency = rng.uniform(0.2, 1.2, size=(2, n, 1)) * math.pi
        phase = rng.uniform(0, 2 * math.pi, size=(2, n, 1))
        wave_x = np.cos(frequency[0] * grid + phase[0]).astype(np.float32)
        wave_y = (np.cos(frequency[1] * grid + phase[1]) * (amplitude / 2)).astype(np.float32)
        field += wave_y[:, :, None] * wave_x[:, None, :]
    return field


def _add_debris(config: SynthConfig, rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Single-pixel dark or bright specks; the blur turns them into small blobs."""
    n, pixels = canvas.shape[0], canvas[0].size
    specks = np.asarray(rng.poisson(config.natural.debris_per_image, size=n))
    total = int(specks.sum())
    flat = np.repeat(np.arange(n), specks) * pixels + rng.integers(0, pixels, size=total)
    strength = rng.uniform(25, 70, size=total) * rng.choice([-1.0, 1.0], size=total)
    np.add.at(canvas.reshape(-1), flat, strength.astype(np.float32))


# --- blur, noise -------------------------------------------------------------------------------


_UNIFORM_BYTE_STD = math.sqrt((256**2 - 1) / 12)


def _unit_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance float32 noise from uniform random bytes.

    Uniform rather than Gaussian: at the few grey levels it is used for the shape does not show,
    and it costs a fraction of rng.standard_normal."""
    codes = np.frombuffer(rng.bytes(math.prod(shape)), dtype=np.int8)
    noise = codes.astype(np.float32)
    noise += np.float32(0.5)  # int8 is -128..127: centre it
    noise *= np.float32(1 / _UNIFORM_BYTE_STD)
    return noise.reshape(shape)


def _pad_edges(images: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Replicate the first and last row (axis 1) or column (axis 2) radius times."""
    shape = list(images.shape)
    shape[axis] += 2 * radius
    padded = np.empty(shape, dtype=images.dtype)
    inner = [slice(None)] * 3
    inner[axis] = slice(radius, radius + images.shape[axis])
    padded[tuple(inner)] = images
    for side, source in ((slice(0, radius), slice(0, 1)), (slice(-radius, None), slice(-1, None))):
        target = [slice(None)] * 3
        target[axis] = side
        edge = [slice(None)] * 3
        edge[axis] = source
        padded[tuple(target)] = images[tuple(edge)]
    return padded


def _blur_radius(config: SynthConfig) -> int:
    """Kernel half-width: about 2 sigma of the strongest blur."""
    return max(1, round(2 * config.blur_sigma[1]))


def _sigma_levels(config: SynthConfig) -> np.ndarray:
    """The blur strengths images draw from: _SIGMA_LEVELS evenly spaced values of the range."""
    low, high = config.blur_sigma
    return np.maximum(low + (np.arange(_SIGMA_LEVELS) + 0.5) * (high - low) / _SIGMA_LEVELS, 1e-3)


def _gaussian_taps(sigma: np.ndarray, radius: int) -> np.ndarray:
    """One-sided normalised Gaussian taps (n, radius + 1), one row per sigma."""
    offsets = np.arange(radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    taps /= taps[:, :1] + 2 * taps[:, 1:].sum(axis=1, keepdims=True)
    return taps.astype(np.float32)


def _convolve_flat(
    flat: np.ndarray, taps: np.ndarray, radius: int, step: int, length: int
) -> np.ndarray:
    """Symmetric convolution along flattened data whose neighbours are `step` apart.

    flat: (n, length + 2 * radius * step), padded; returns (n, length)."""
    centre = radius * step
    out = flat[:, centre : centre + length] * taps[:, :1]
    pair = np.empty_like(out)
    for t in range(1, radius + 1):
        ahead = flat[:, centre + t * step : centre + t * step + length]
        behind = flat[:, centre - t * step : centre - t * step + length]
        np.add(ahead, behind, out=pair)
        pair *= taps[:, t : t + 1]
        out += pair
    return out


def _blur(images: np.ndarray, taps: np.ndarray, blend: float) -> np.ndarray:
    """Separable Gaussian blur (per-image taps), blended with the sharp image.

    Both passes run on flattened images, so every numpy call streams over one long row per
    image: horizontal neighbours are 1 apart (rows edge-padded), vertical ones W apart."""
    n, height, width = images.shape
    radius = taps.shape[1] - 1
    padded = _pad_edges(images, radius, axis=2).reshape(n, -1)
    row_length = width + 2 * radius
    horizontal = np.empty((n, height * row_length), dtype=np.float32)
    valid = height * row_length - 2 * radius
    horizontal[:, :valid] = _convolve_flat(padded, taps, radius, 1, valid)
    rows = horizontal.reshape(n, height, row_length)[:, :, :width]
    padded = _pad_edges(rows, radius, axis=1).reshape(n, -1)
    blurred = _convolve_flat(padded, taps, radius, width, height * width).reshape(images.shape)
    blurred -= images
    blurred *= np.float32(blend)
    blurred += images
    return blurred


@functools.lru_cache(maxsize=8)
def _blurred_background_cache(
    pixels: bytes, shape: tuple[int, int], sigmas: tuple[float, ...], radius: int, blend: float
) -> np.ndarray:
    background = np.frombuffer(pixels, dtype=np.float32).reshape(shape)
    copies = np.broadcast_to(background, (len(sigmas), *shape))
    blurred = _blur(np.ascontiguousarray(copies), _gaussian_taps(np.array(sigmas), radius), blend)
    blurred.setflags(write=False)  # shared between threads through the cache
    return blurred


def _blurred_backgrounds(config: SynthConfig, background: np.ndarray) -> np.ndarray:
    """(levels, H, W): the background blurred (and blended) with every sigma level."""
    return _blurred_background_cache(
        np.ascontiguousarray(background, dtype=np.float32).tobytes(),
        background.shape,
        tuple(float(sigma) for sigma in _sigma_levels(config)),
        _blur_radius(config),
        config.blur_blend,
    )


def _paint_blurred(
    config: SynthConfig,
    canvas: np.ndarray,
    cells: _Cells,
    background: np.ndarray,
    level: np.ndarray,
) -> bool:
    """Blur by linearity: canvas = blurred background + blurred (cell - background), the second
    term computed on small patches around the cells only (5-10x less work than blurring whole
    images). Needs cells that share no pixel and patches inside the image; returns False
    (canvas untouched) otherwise."""
    size = config.image_size
    radius = _blur_radius(config)
    groups = _patch_groups(config, cells, pad=0)
    layout = cells.layout
    for group in groups:
        half = group.grid.half + radius  # the blur spreads each cell by `radius` pixels
        x, y = layout.x[group.cells], layout.y[group.cells]
        if x.min() < half or y.min() < half or max(x.max(), y.max()) > size - 1 - half:
            return False
    backgrounds = _blurred_backgrounds(config, background)
    for image, chosen in enumerate(level):  # per-image copies beat a fancy-indexed gather
        canvas[image] = backgrounds[chosen]
    target = canvas.reshape(-1)
    background_flat = background.reshape(-1)
    blend = np.float32(config.blur_blend)
    rim_edge = np.float32(-config.rim_width_px)
    taps = _gaussian_taps(_sigma_levels(config)[level], radius)[layout.image]
    for group in groups:
        big = _grid(group.grid.half + radius, size)  # the cell's patch plus the blur's reach
        side = 2 * big.half + 1
        patch_size = side * side
        margin = radius * side  # zero rows above and below, so convolutions need no padding
        rows, cols = np.nonzero(group.signed <= 0)
        cell = group.cells[rows]
        values = np.where(group.signed[rows, cols] > rim_edge, cells.rim[cell], cells.fill[cell])
        pixel = group.centre[rows] % (size * size) + group.grid.flat_offset[cols]
        delta = np.zeros((len(group.cells), patch_size + 2 * margin), dtype=np.float32)
        embedded = _embedding(group.grid.half, radius) + margin
        delta.reshape(-1)[rows * delta.shape[1] + embedded[cols]] = values - background_flat[pixel]
        group_taps = taps[group.cells]
        horizontal = np.zeros_like(delta)
        horizontal[:, radius:-radius] = _convolve_flat(
            delta, group_taps, radius, 1, delta.shape[1] - 2 * radius
        )
        change = _convolve_flat(horizontal, group_taps, radius, side, patch_size)
        change *= blend
        change += (1 - blend) * delta[:, margin : margin + patch_size]
        pixels = group.centre[:, None] + big.flat_offset[None, :]
        np.add.at(target, pixels.reshape(-1), change.reshape(-1))
    return True


@functools.lru_cache(maxsize=64)
def _embedding(half: int, pad: int) -> np.ndarray:
    """Index of each pixel of a (2 half + 1)^2 patch within the patch grown by pad per side."""
    offsets = np.arange(-half, half + 1)
    side = 2 * (half + pad) + 1
    index = (np.repeat(offsets, len(offsets)) + half + pad) * side
    index += np.tile(offsets, len(offsets)) + half + pad
    index.setflags(write=False)
    return index


# --- chunks ------------------------------------------------------------------------------------


def _render_chunk(
    config: SynthConfig, seed: int, chunk: int, background: np.ndarray
) -> tuple[np.ndarray, np.ndarray, _Cells]:
    """CHUNK_SIZE images (uint8), their counts (int16) and the cells of one chunk."""
    key = (_MODALITY_KEYS[config.modality], _STYLE_KEYS[config.style], chunk)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))
    n = CHUNK_SIZE
    counts = _sample_counts(config, rng, n)
    cells = _sample_cells(config, rng, counts)
    level = rng.integers(0, _SIGMA_LEVELS, size=n)
    noise_std = rng.uniform(*config.noise_std, size=n).astype(np.float32)[:, None, None]
    blurring = config.blur_blend > 0 and config.blur_sigma[1] > 0
    canvas = np.empty((n, *background.shape), dtype=np.float32)
    blurred = False
    if config.style == "natural":
        canvas[:] = background
        _add_debris(config, rng, canvas)
        _paint_natural(config, canvas, cells, rng)
        canvas *= _illumination(config, rng, n)
    elif blurring and config.overlap_px < 2 * _GAP_PX:
        blurred = _paint_blurred(config, canvas, cells, background, level)
    if not blurred and config.style == "synthetic":
        canvas[:] = background
        _paint_synthetic(config, canvas, cells)
    taps = _gaussian_taps(_sigma_levels(config)[level], _blur_radius(config))
    images = np.empty(canvas.shape, dtype=np.uint8)
    for start in range(0, n, _FINISH_BLOCK):  # a few images at a time stay in cache
        b = slice(start, start + _FINISH_BLOCK)
        block = canvas[b]
        if blurring and not blurred:
            block = _blur(block, taps[b], config.blur_blend)
        block_noise = _unit_noise(rng, block.shape)
        if config.style == "natural":
            scale = np.sqrt(np.clip(block, 1, 255))
            scale *= np.float32(config.natural.shot_noise)
            scale += noise_std[b]
            block_noise *= scale
        else:
            block_noise *= noise_std[b]
        block += block_noise
        np.clip(block, 0, 255, out=block)
        block += np.float32(0.5)  # round half up by truncation
        images[b] = block
    return images, counts.astype(np.int16), cells


def _chunks(
    config: SynthConfig,
    seed: int,
    chunk_ids: range,
    background: np.ndarray,
    workers: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, _Cells]]:
    if workers <= 1 or len(chunk_ids) <= 1:
        for chunk in chunk_ids:
            yield _render_chunk(config, seed, chunk, background)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda c: _render_chunk(config, seed, c, background), chunk_ids)


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")


# --- public API --------------------------------------------------------------------------------


def generate(
    config: SynthConfig,
    count: int,
    seed: int,
    background: np.ndarray | None = None,
    *,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> ImageSet:
    """`count` images with their cell counts; image i depends only on (config, seed, i).

    Domain is "synthetic" for style "synthetic" (names syn_000000.png, ...) and "natural" for
    style "natural" (names nat_000000.png, ...). background: float (H, W) grey levels, default
    flat config.background_grey. progress(k) is called with the number of new images after each
    chunk. workers > 1 renders chunks in threads (same bytes; numpy releases the GIL).
    """
    return generate_layout(config, count, seed, background, workers=workers, progress=progress)[0]


def generate_layout(
    config: SynthConfig,
    count: int,
    seed: int,
    background: np.ndarray | None = None,
    *,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[ImageSet, CellLayout]:
    """Like generate, plus the position and size of every cell (for tests and inspection)."""
    if count < 0:
        raise ConfigError(f"count must be >= 0, got {count}")
    _check_seed(seed)
    background = _check_background(background, config)
    size = config.image_size
    images = np.empty((count, size, size), dtype=np.uint8)
    counts = np.empty(count, dtype=np.int16)
    layouts: list[CellLayout] = []
    chunk_ids = range(-(-count // CHUNK_SIZE))
    for chunk, (chunk_images, chunk_counts, cells) in zip(
        chunk_ids, _chunks(config, seed, chunk_ids, background, workers), strict=True
    ):
        start = chunk * CHUNK_SIZE
        stop = min(start + CHUNK_SIZE, count)
        images[start:stop] = chunk_images[: stop - start]
        counts[start:stop] = chunk_counts[: stop - start]
        layout = cells.layout
        keep = layout.image < stop - start
        layouts.append(
            CellLayout(
                image=layout.image[keep] + start,
                x=layout.x[keep],
                y=layout.y[keep],
                radius=layout.radius[keep],
                extent=layout.extent[keep],
            )
        )
        if progress is not None:
            progress(stop - start)
    image_set = ImageSet(
        images=images,
        counts=counts,
        names=image_names(config, 0, count),
        domain="synthetic" if config.style == "synthetic" else "natural",
        modality=config.modality,
        source=f"generated:{config.style}:{config.modality}:seed={seed}",
    )
    fields = ("image", "x", "y", "radius", "extent")
    layout = CellLayout(
        *(
            np.concatenate([getattr(part, name) for part in layouts]) if layouts else np.empty(0)
            for name in fields
        )
    )
    return image_set, layout


def image_names(config: SynthConfig, start: int, stop: int) -> list[str]:
    """Names of images start..stop-1: syn_000000.png (style synthetic) or nat_000000.png."""
    prefix = "syn" if config.style == "synthetic" else "nat"
    return [f"{prefix}_{i:06d}.png" for i in range(start, stop)]


class SyntheticStream:
    """An endless, seeded stream of generated images for training.

    The sequence equals the one generate(config, N, seed, background) returns, whatever batch
    sizes are asked for.
    """

    def __init__(
        self,
        config: SynthConfig,
        seed: int,
        background: np.ndarray | None = None,
        *,
        workers: int = 1,
    ) -> None:
        _check_seed(seed)
        self.config = config
        self.seed = seed
        self.background = _check_background(background, config)
        self.workers = workers
        self._next_chunk = 0
        size = config.image_size
        self._images = np.empty((0, size, size), dtype=np.uint8)
        self._counts = np.empty(0, dtype=np.int16)

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n images (uint8 (n, H, W)) and their counts (int16 (n,))."""
        if n < 0:
            raise ConfigError(f"batch size must be >= 0, got {n}")
        missing = n - len(self._images)
        if missing > 0:
            chunk_ids = range(self._next_chunk, self._next_chunk + -(-missing // CHUNK_SIZE))
            parts = list(_chunks(self.config, self.seed, chunk_ids, self.background, self.workers))
            self._next_chunk = chunk_ids.stop
            self._images = np.concatenate([self._images, *(part[0] for part in parts)])
            self._counts = np.concatenate([self._counts, *(part[1] for part in parts)])
        images, self._images = self._images[:n], self._images[n:]
        counts, self._counts = self._counts[:n], self._counts[n:]
        return images, counts
