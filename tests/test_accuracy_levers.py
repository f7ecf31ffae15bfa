"""Accuracy levers: temporal pseudo-labels, per-chamber background normalisation, count-balanced
sampling, the Poisson regression loss and count-keeping zoom-out augmentation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from _experiment_data import write_fake_cho_k1
from twinvae.config import AugmentConfig, DataConfig, PseudoLabelConfig, config_from_dict
from twinvae.data.imageset import ImageSet
from twinvae.errors import DataError
from twinvae.training.augment import augment_batch
from twinvae.training.data import (
    NaturalSampler,
    chamber_normalised,
    prepare_data,
    pseudo_label_targets,
)
from twinvae.training.losses import POISSON_FLOOR, poisson_deviance, regression_loss
from twinvae.training.trainer import Trainer


def _frames(chamber: int, frames: list[int], counts: list[int]) -> tuple[list[str], list[int]]:
    names = [f"e01xy{chamber:02d}t{frame:03d}c1.png" for frame in frames]
    return names, counts


def _set(parts: list[tuple[list[str], list[int]]], images: np.ndarray | None = None) -> ImageSet:
    names = [name for part in parts for name in part[0]]
    counts = [count for part in parts for count in part[1]]
    if images is None:
        images = np.zeros((len(names), 8, 8), dtype=np.uint8)
    return ImageSet(images, np.array(counts), names)


# --- temporal pseudo-labels ------------------------------------------------------------------


def test_pseudo_labels_interpolate_in_time_within_the_gap_of_their_own_chamber() -> None:
    images = _set(
        [
            # chamber 1: labels 2 at t1 and 6 at t5, then a gap of 30 frames to t35
            _frames(1, [1, 2, 3, 5, 20, 35, 40], [2, 0, 0, 6, 0, 8, 0]),
            # chamber 2: one label only, nothing to interpolate between
            _frames(2, [1, 3, 5], [0, 4, 0]),
        ]
    )
    targets, weights = pseudo_label_targets(images, PseudoLabelConfig(max_gap=25, weight=0.8))
    np.testing.assert_allclose(targets[:7], [2, 3, 4, 6, 0, 8, 0])
    # beside a label 0.8 * 3/4, midway 0.8 / 2; real labels keep weight 1
    np.testing.assert_allclose(weights[:7], [1, 0.6, 0.4, 1, 0, 1, 0])
    np.testing.assert_array_equal(targets[7:], [0, 4, 0])  # no extrapolation, no other chamber
    np.testing.assert_array_equal(weights[7:], [0, 1, 0])


def test_pseudo_labels_need_chamber_and_frame_in_the_names() -> None:
    images = ImageSet(np.zeros((2, 8, 8), np.uint8), np.array([1, 0]), ["a.png", "b.png"])
    with pytest.raises(DataError, match=r"data\.pseudo_labels.*'a\.png'"):
        pseudo_label_targets(images, PseudoLabelConfig())


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # odd frames labelled, even ones not: every even frame lies between two labels
    return write_fake_cho_k1(tmp_path_factory.mktemp("cho-k1"), train_chambers=5, frames=7)


def test_prepare_data_gives_pseudo_labels_to_training_chambers_only(fake_root: Path) -> None:
    config = DataConfig(
        natural=str(fake_root / "pc"),
        natural_only=True,
        val_fraction=0.4,
        pseudo_labels=PseudoLabelConfig(max_gap=2),
    )
    data = prepare_data(config, seed=0)
    train, targets = data.natural_train, data.natural_targets
    assert targets is not None and data.natural_weights is not None
    pseudo = (targets > 0) & ~train.labelled
    assert pseudo.sum() == (~train.labelled).sum() > 0  # every even frame is between labels
    assert np.all(data.natural_weights[pseudo] == 0.5)  # midway between two labels
    # validation keeps its own counts: unlabelled frames there stay unlabelled
    assert (~data.natural_val.labelled).any()
    plain = prepare_data(config.model_copy(update={"pseudo_labels": None}), seed=0)
    assert plain.natural_targets is None
    np.testing.assert_array_equal(plain.natural_val.counts, data.natural_val.counts)


def test_sampler_draws_pseudo_labelled_frames_only_when_given_targets() -> None:
    images = _set([_frames(1, [1, 2, 3], [2, 0, 4])])
    targets = np.array([2, 3, 4], dtype=np.float32)
    rng = np.random.default_rng(0)
    plain = NaturalSampler(images, 1.0).sample(64, rng)
    with_pseudo = NaturalSampler(images, 1.0, targets=targets).sample(64, rng)
    assert 1 not in plain
    assert 1 in with_pseudo


def test_weighted_regression_loss_scales_each_image_by_its_weight() -> None:
    predicted = torch.tensor([3.0, 5.0, 9.0])
    plain = regression_loss(predicted, torch.tensor([2.0, 2.0, 0.0]))
    weighted = regression_loss(predicted, torch.tensor([[2.0, 1.0], [2.0, 0.5], [0.0, 0.0]]))
    assert plain.item() == pytest.approx((1 + 9) / 2)
    assert weighted.item() == pytest.approx((1 + 0.5 * 9) / 2)


def test_trainer_hands_pseudo_labels_and_weights_to_the_loss(
    fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_from_dict(
        {
            "data": {
                "natural": str(fake_root / "pc"),
                "natural_only": True,
                "val_fraction": 0.4,
                "labelled_fraction": 1.0,
                "pseudo_labels": {"max_gap": 2, "weight": 0.5},
            },
            "model": {"base_channels": 4, "latent_dim": 8, "regressor_hidden": [8]},
            "loss": {"rec_weight": 0, "kl_weight": 0, "decoder_off": True},
            "train": {"epochs": 1, "batch_size": 8, "steps_per_epoch": 1, "device": "cpu"},
        }
    )
    seen: list[torch.Tensor] = []

    def record(predicted: torch.Tensor, targets: torch.Tensor, kind: str = "mse") -> torch.Tensor:
        seen.append(targets)
        return regression_loss(predicted, targets, kind)

    monkeypatch.setattr("twinvae.training.losses.regression_loss", record)
    Trainer(config, tmp_path / "run", progress=False).fit()
    assert seen and seen[0].shape == (8, 2)
    weights = seen[0][:, 1].tolist()
    assert set(weights) <= {1.0, 0.25}  # real labels 1, midway pseudo-labels 0.5 / 2
    assert 0.25 in weights


# --- per-chamber background ------------------------------------------------------------------


def test_chamber_background_removes_each_chambers_static_pattern() -> None:
    rng = np.random.default_rng(0)
    parts, stacks = [], []
    for chamber in (1, 2):
        pattern = rng.integers(30, 200, (16, 16)).astype(np.uint8)  # walls, dirt: static
        frames = np.repeat(pattern[None], 9, axis=0)
        for index in range(9):  # a moving bright cell, never twice on the same pixels
            frames[index, index, index] = 250
        stacks.append(frames)
        parts.append(_frames(chamber, list(range(1, 10)), [1] * 9))
    images = _set(parts, np.concatenate(stacks))
    for mode in ("subtract", "divide"):
        normalised = chamber_normalised(images, mode).images.astype(float)
        cells = np.zeros(normalised.shape, bool)
        for index in range(18):
            cells[index, index % 9, index % 9] = True
        background = np.where(cells, np.nan, normalised)
        # the pattern is gone: every background pixel sits at its chamber's mean level
        assert np.nanmax(np.nanstd(background.reshape(2, -1), axis=1)) < 1.0
        assert np.all(normalised[cells] > np.nanmax(background) + 5)
    assert images.images.reshape(2, -1).std(axis=1).min() > 30  # it was there before


def test_chamber_background_applies_to_held_out_sets_in_the_protocol(
    fake_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twinvae.evaluation import evaluate as evaluate_module
    from twinvae.protocols.folds import fold_file_text, list_frames, load_folds, make_fold_file
    from twinvae.protocols.runner import ProtocolRun, resolve_method, run_protocol

    folds = tmp_path / "folds.yaml"
    folds.write_text(fold_file_text(make_fold_file(list_frames(fake_root, "pc"), "pc", 2, 0)))
    config = tmp_path / "tiny-cnn.yaml"
    config.write_text(
        "name: tiny-cnn\n"
        "data: {natural: null, modality: pc, natural_only: true, labelled_fraction: 1.0,\n"
        "       chamber_background: subtract}\n"
        "model: {base_channels: 4, latent_dim: 8, regressor_hidden: [8]}\n"
        "loss: {rec_weight: 0, kl_weight: 0, decoder_off: true}\n"
        "train: {epochs: 1, steps_per_epoch: 1, batch_size: 4, early_stopping_patience: null,\n"
        "        precision: fp32}\n",
        encoding="utf-8",
    )
    evaluated: list[ImageSet] = []
    real_evaluate = evaluate_module.evaluate

    def spy(model_path: Path, image_set: ImageSet, **options: Any) -> dict[str, Any]:
        evaluated.append(image_set)
        return real_evaluate(model_path, image_set, **options)

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    run = ProtocolRun(tmp_path / "out", str(fake_root))
    run.fold_file, run.fold_file_path = load_folds(folds), folds
    outcome = run_protocol("chamber-cv", resolve_method(str(config), None), run, folds=[0])[0]
    assert outcome.result is not None
    assert json.loads(outcome.result.read_text())["config"]["data"]["chamber_background"] == (
        "subtract"
    )
    from twinvae.data.readers import read_count_csv

    raw = read_count_csv(outcome.unit.test_csv, modality="pc")
    (held_out,) = evaluated
    np.testing.assert_array_equal(held_out.images, chamber_normalised(raw, "subtract").images)
    assert not np.array_equal(held_out.images, raw.images)


# --- against shrinkage -----------------------------------------------------------------------


def test_balanced_sampling_draws_rare_counts_as_often_as_common_ones() -> None:
    counts = [1] * 90 + [5] * 10
    images = _set([_frames(1, list(range(1, 101)), counts)])
    rng = np.random.default_rng(0)
    plain = images.counts[NaturalSampler(images, 1.0).sample(4000, rng)]
    balanced = images.counts[NaturalSampler(images, 1.0, balance_counts=True).sample(4000, rng)]
    assert np.mean(plain == 5) < 0.15
    assert abs(np.mean(balanced == 5) - 0.5) < 0.05


def test_balanced_sampling_keeps_the_labelled_share_of_a_batch() -> None:
    images = _set([_frames(1, list(range(1, 11)), [1, 1, 1, 2, 0, 0, 0, 0, 0, 0])])
    batch = NaturalSampler(images, 0.5, balance_counts=True).sample(10, np.random.default_rng(0))
    assert (images.counts[batch] > 0).sum() == 5


def test_poisson_deviance_is_zero_at_the_count_and_weights_errors_by_one_over_count() -> None:
    counts = torch.tensor([2.0, 20.0])
    assert poisson_deviance(counts, counts).abs().max().item() < 1e-6
    predicted = (counts + 1).requires_grad_()
    poisson_deviance(predicted, counts).sum().backward()
    assert predicted.grad is not None
    ratio = (predicted.grad[0] / predicted.grad[1]).item()
    assert ratio > 5  # one cell too many costs far more at 2 cells than at 20


def test_poisson_deviance_stays_finite_and_smooth_below_zero() -> None:
    counts = torch.tensor([3.0, 3.0, 3.0])
    predicted = torch.tensor([-2.0, POISSON_FLOOR - 1e-4, POISSON_FLOOR + 1e-4], requires_grad=True)
    loss = poisson_deviance(predicted, counts)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and predicted.grad is not None
    assert loss[1].item() == pytest.approx(loss[2].item(), rel=1e-3)  # continuous at the floor
    assert predicted.grad[0].item() < predicted.grad[1].item() < 0  # pushes up, harder far below


def test_poisson_regression_loss_is_selected_by_the_loss_config() -> None:
    predicted, counts = torch.tensor([3.0, 7.0]), torch.tensor([2.0, 0.0])
    assert regression_loss(predicted, counts, "poisson").item() == pytest.approx(
        poisson_deviance(predicted[:1], counts[:1]).item()
    )
    assert config_from_dict({"loss": {"regression": "poisson"}}).loss.regression == "poisson"


def _corner_cells() -> torch.Tensor:
    """Flat grey images with one bright 6 x 6 cell in each corner, 4 px from the edges."""
    images = torch.full((16, 1, 64, 64), 0.3)
    for rows in (slice(4, 10), slice(-10, -4)):
        for cols in (slice(4, 10), slice(-10, -4)):
            images[:, :, rows, cols] = 0.9
    return images


def _cells_per_image(images: torch.Tensor) -> list[int]:
    return [int(ndimage.label(image[0].numpy() > 0.6)[1]) for image in images]


@pytest.mark.parametrize("rotation", [0.0, 10.0])
def test_zoom_out_keeps_every_cell_and_adds_none(rotation: float) -> None:
    config = AugmentConfig(
        crop_scale=1.0, zoom_out=1.6, noise_std=0.0, max_rotation_deg=rotation, flips=False
    )
    out = augment_batch(_corner_cells(), config, torch.Generator().manual_seed(0))
    assert _cells_per_image(out) == [4] * 16
    # the border around the shrunk image is the image's median grey
    assert out.amax(dim=(1, 2, 3)).min() > 0.6
    assert torch.isclose(out[:, :, 32, :2], torch.tensor(0.3)).all()
