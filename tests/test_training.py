"""Trainer: run folder, metrics, exact resume, NaN handling, transfer strategies, DDP."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from twinvae.config import ExperimentConfig, config_from_dict
from twinvae.data.imageset import ImageSet
from twinvae.training import trainer as trainer_module
from twinvae.training.checkpoint import load_checkpoint
from twinvae.training.data import TrainingData
from twinvae.training.device import Runtime
from twinvae.training.trainer import (
    Trainer,
    TrainingDivergedError,
    domain_threads,
    train,
    uses_domain_passes,
)
from twinvae.training.transfer import trainable_groups

TINY_MODEL = {"base_channels": 4, "latent_dim": 8, "regressor_hidden": [8]}
TIMING_COLUMNS = {"seconds", "images_per_second"}


def _image_set(n: int, seed: int, domain: str = "natural", labelled_share: float = 1.0) -> ImageSet:
    """Images whose bright area grows with the count, so the regressor has something to learn."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 9, n)
    images = (rng.random((n, 128, 128)) * 40).astype(np.uint8)
    for i, count in enumerate(counts):
        images[i, : count * 8, :] += 120
    counts[int(n * labelled_share) :] = 0
    names = [f"e01xy{i % 4:02d}t{i:03d}c1.png" for i in range(n)]
    return ImageSet(images, counts, names, domain=domain)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_data() -> TrainingData:
    return TrainingData(
        natural_train=_image_set(48, 0, labelled_share=0.5),
        natural_val=_image_set(12, 1),
        synthetic=_image_set(48, 2, "synthetic"),
        synthetic_val=_image_set(12, 3, "synthetic"),
    )


def _config(**sections: dict) -> ExperimentConfig:
    base = {
        "model": TINY_MODEL,
        "train": {"epochs": 3, "batch_size": 8, "steps_per_epoch": 3, "device": "cpu"},
        "data": {"synthetic": "stored"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return config_from_dict(base)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as stream:
        return [
            {k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(stream)
        ]


def test_run_folder_holds_config_metrics_and_checkpoints(
    tmp_path: Path, tiny_data: TrainingData
) -> None:
    config = _config()
    result = train(config, tmp_path / "run", data=tiny_data, progress=False)
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.csv", "last.pt", "best.pt"} <= {p.name for p in run.iterdir()}
    assert not list(run.glob("*.tmp"))
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(float(r["val_mae"]) >= 0 for r in rows)
    best = load_checkpoint(run / "best.pt")
    assert best.config == config
    assert best.metrics["val_mae"] == pytest.approx(result.best_val_mae)
    assert load_checkpoint(run / "last.pt").epoch == 2


def test_fresh_regressor_starts_at_the_mean_label(tmp_path: Path, tiny_data: TrainingData) -> None:
    train_set = tiny_data.natural_train
    mean_label = float(train_set.counts[train_set.labelled].mean())
    fresh = Trainer(_config(), tmp_path / "fresh", data=tiny_data, progress=False)
    assert float(fresh.model.regressor[-1].bias.detach()) == pytest.approx(mean_label)

    source = train(_config(train={"epochs": 1}), tmp_path / "src", data=tiny_data, progress=False)
    state = load_checkpoint(source.last_checkpoint).model_state
    source_bias = state[[k for k in state if k.startswith("regressor.")][-1]]
    assert float(source_bias) != pytest.approx(mean_label)  # training moved it
    transferred = Trainer(
        _config(transfer={"from_checkpoint": str(source.last_checkpoint)}),
        tmp_path / "transfer",
        data=tiny_data,
        progress=False,
    )
    assert torch.equal(transferred.model.regressor[-1].bias.detach(), source_bias)


def test_existing_run_folder_is_not_overwritten(tmp_path: Path, tiny_data: TrainingData) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty"):
        train(_config(), run, data=tiny_data, progress=False)
    assert (run / "notes.txt").read_text() == "mine"


def test_killed_run_resumes_to_identical_metrics(
    tmp_path: Path, tiny_data: TrainingData, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config()
    train(config, tmp_path / "straight", data=tiny_data, progress=False)

    real_augment = trainer_module.augment_batch
    calls = {"n": 0}

    def killed_in_third_epoch(*args, **kwargs):  # two augment calls (natural, synthetic) per step
        calls["n"] += 1
        if calls["n"] == 2 * 3 * 2 + 3:
            raise KeyboardInterrupt
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "augment_batch", killed_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", data=tiny_data, progress=False)
    assert len(_rows(tmp_path / "resumed")) == 2
    monkeypatch.setattr(trainer_module, "augment_batch", real_augment)
    train(config, tmp_path / "resumed", data=tiny_data, progress=False, resume=True)
    assert _rows(tmp_path / "resumed") == _rows(tmp_path / "straight")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path: Path, tiny_data: TrainingData, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_loss = trainer_module.twin_domain_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        if calls["n"] > 2 * 3:  # the second epoch goes wrong
            loss.total = loss.total * float("nan")
        return loss

    monkeypatch.setattr(trainer_module, "twin_domain_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="last good checkpoint"):
        train(_config(), tmp_path / "run", data=tiny_data, progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt").epoch == 0
    assert len(_rows(tmp_path / "run")) == 1


def test_early_stopping(tmp_path: Path, tiny_data: TrainingData) -> None:
    config = _config(train={"epochs": 30, "early_stopping_patience": 1}, optim={"lr": 1e-9})
    result = train(config, tmp_path / "run", data=tiny_data, progress=False)
    assert result.stopped_early
    assert result.epochs_run < 30


@pytest.mark.parametrize(
    ("strategy", "frozen_prefixes"),
    [
        ("simultaneous", []),
        ("frozen-outer", ["encoders.", "decoders."]),
        ("frozen-core", ["shared_encoder.", "shared_decoder."]),
    ],
)
def test_transfer_strategies_freeze_the_right_parameters(
    tmp_path: Path, tiny_data: TrainingData, strategy: str, frozen_prefixes: list[str]
) -> None:
    source = train(
        _config(train={"epochs": 1}), tmp_path / "source", data=tiny_data, progress=False
    )
    before = load_checkpoint(source.last_checkpoint).model_state
    config = _config(
        transfer={"from_checkpoint": str(source.last_checkpoint), "strategy": strategy},
        train={"epochs": 2},
    )
    train(config, tmp_path / "transfer", data=tiny_data, progress=False)
    after = load_checkpoint(tmp_path / "transfer" / "last.pt").model_state
    for name, tensor in before.items():
        frozen = any(name.startswith(prefix) for prefix in frozen_prefixes)
        if not torch.is_floating_point(tensor) or "running_" in name:
            continue
        if frozen:
            assert torch.equal(tensor, after[name]), f"{strategy}: frozen {name} changed"
    changed = [
        n
        for n in before
        if torch.is_floating_point(before[n]) and not torch.equal(before[n], after[n])
    ]
    assert any(n.startswith("regressor.") for n in changed)
    if not frozen_prefixes:
        assert any(n.startswith("encoders.") for n in changed)


def test_thaw_unfreezes_stage_by_stage() -> None:
    config = _config(
        transfer={"strategy": "thaw", "thaw_stages": [["regressor"], ["core"], ["outer"]]}
    )
    assert config.transfer is not None
    stages = [trainable_groups(config.transfer, epoch, 6) for epoch in range(6)]
    assert stages[0] == stages[1] == {"regressor"}
    assert stages[2] == {"regressor", "core"}
    assert stages[5] == {"regressor", "core", "outer"}


def test_decoder_off_and_natural_only_run(tmp_path: Path, tiny_data: TrainingData) -> None:
    config = _config(loss={"decoder_off": True}, data={"synthetic": None, "natural_only": True})
    train(config, tmp_path / "run", data=tiny_data, progress=False)
    rows = _rows(tmp_path / "run")
    assert all(float(r["natural_rec"]) == 0.0 for r in rows)
    assert all(r["synthetic_reg"] == "" for r in rows)


def test_double_transfer_runs_both_legs(
    tmp_path: Path, tiny_data: TrainingData, monkeypatch
) -> None:
    from twinvae.training import runner

    source = train(
        _config(train={"epochs": 1}), tmp_path / "source", data=tiny_data, progress=False
    )
    monkeypatch.setattr(
        runner,
        "train",
        lambda cfg, run_dir, progress: train(cfg, run_dir, data=tiny_data, progress=False),
    )
    config = _config(
        train={"epochs": 1},
        transfer={
            "second_stage": {"epochs": 1, "data": {"modality": "pc"}, "strategy": "frozen-core"}
        },
    )
    results = runner.run_transfer(
        config, source.last_checkpoint, tmp_path / "double", progress=False
    )
    assert [r.run_dir.name for r in results] == ["leg1", "leg2"]
    leg2 = load_checkpoint(tmp_path / "double" / "leg2" / "last.pt").config
    assert leg2.transfer is not None and leg2.transfer.strategy == "frozen-core"
    assert leg2.transfer.from_checkpoint == str(tmp_path / "double" / "leg1" / "best.pt")


def test_noise_augmentation_draws_a_level_per_image_up_to_noise_std() -> None:
    """One fixed noise level biased the counts of clean images; the level now varies."""
    from twinvae.config import AugmentConfig
    from twinvae.training.augment import augment_batch

    config = AugmentConfig(
        flips=False, rot90=False, max_rotation_deg=0.0, crop_scale=1.0, noise_std=0.05
    )
    flat = torch.full((256, 1, 32, 32), 0.5)
    generator = torch.Generator().manual_seed(0)
    levels = (augment_batch(flat, config, generator) - 0.5).flatten(1).std(dim=1)
    assert float(levels.max()) <= 0.05 * 1.1
    assert float(levels.min()) < 0.05 * 0.1  # some images are almost clean
    assert 0.05 * 0.4 < float(levels.mean()) < 0.05 * 0.6  # uniform in [0, 0.05]


def test_augmentation_grid_matches_torch_affine_grid() -> None:
    import torch.nn.functional as F

    from twinvae.training.augment import affine_grid

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(4))
    expected = F.affine_grid(theta, [5, 1, 24, 40], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, 24, 40), expected)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The suite runs on one torch thread; the domain threads need two."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
def test_domain_passes_side_by_side_give_the_numbers_of_one_after_the_other(
    tmp_path: Path, tiny_data: TrainingData
) -> None:
    """Two threads at one torch thread each against one thread doing the passes in turn: the
    same random numbers, the same order of running statistics, bit for bit."""
    states = {}
    for parallel in (True, False):
        torch.set_num_threads(2 if parallel else 1)  # one per pass either way: same rounding
        config = _config(train={"parallel_domains": parallel, "precision": "fp32"})
        trainer = Trainer(config, tmp_path / str(parallel), data=tiny_data, progress=False)
        assert trainer.domain_passes is not None
        assert (trainer.domain_passes.threads is not None) == parallel
        row = trainer._train_epoch(0, lambda: None)  # the gradients of its last step stay
        assert torch.get_num_threads() == (2 if parallel else 1)  # threads keep their own count
        states[parallel] = {
            "row": {key: row[key] for key in ("loss", "natural_rec", "synthetic_kl")},
            "grads": {n: p.grad for n, p in trainer.model.named_parameters()},
            "params": dict(trainer.model.named_parameters()),
            "buffers": dict(trainer.model.named_buffers()),
        }
        trainer.stop_domain_threads()
    side_by_side, in_turn = states[True], states[False]
    assert side_by_side["row"] == in_turn["row"]
    for kind in ("grads", "params", "buffers"):
        assert side_by_side[kind].keys() == in_turn[kind].keys()
        for name, tensor in in_turn[kind].items():
            assert tensor is not None and torch.equal(side_by_side[kind][name], tensor), name
    buffers = side_by_side["buffers"]
    assert int(buffers["shared_decoder.deconv.1.num_batches_tracked"]) == 2 * 3  # both domains
    shared = side_by_side["grads"]["shared_encoder.conv.0.weight"]
    assert shared is not None and float(shared.abs().max()) > 0


@pytest.mark.usefixtures("two_threads")
def test_domain_threads_only_with_two_domains_in_one_cpu_process(
    tmp_path: Path, tiny_data: TrainingData
) -> None:
    natural_only = _config(data={"natural_only": True, "synthetic": None})
    trainer = Trainer(natural_only, tmp_path / "natural", data=tiny_data, progress=False)
    assert trainer.domain_passes is not None and trainer.domain_passes.threads is None
    cpu = Runtime(torch.device("cpu"), "fp32")
    assert uses_domain_passes(cpu) and uses_domain_passes(Runtime(torch.device("cpu"), "bf16"))
    assert not uses_domain_passes(Runtime(torch.device("cpu"), "fp32", rank=0, world_size=2))
    assert not uses_domain_passes(Runtime(torch.device("cuda"), "fp16"))
    off = _config(train={"parallel_domains": False})
    assert domain_threads(cpu, off, True) is None
    assert domain_threads(cpu, _config(), two_domains=False) is None
    threads = domain_threads(cpu, _config(), True)
    assert threads is not None
    assert threads.submit(torch.get_num_threads).result() == 1  # half of two
    threads.shutdown()
    torch.set_num_threads(1)
    assert domain_threads(cpu, _config(), True) is None


def test_configs_naming_parallel_backward_still_load() -> None:
    assert not _config(train={"parallel_backward": False}).train.parallel_domains
    assert _config(train={"parallel_backward": True}).train.parallel_domains


@pytest.mark.usefixtures("two_threads")
def test_domain_passes_with_a_fully_frozen_domain(tmp_path: Path, tiny_data: TrainingData) -> None:
    """First thaw stage, regressor not started: the synthetic loss reaches no trainable layer."""
    config = _config(
        transfer={"strategy": "thaw", "thaw_stages": [["outer_natural"], ["core"]]},
        loss={"regressor_start_epoch": 1},
        train={"epochs": 2},
    )
    result = train(config, tmp_path / "run", data=tiny_data, progress=False)
    assert result.epochs_run == 2
