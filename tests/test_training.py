"""Trainer: run folder, metrics, exact resume, NaN handling, transfer strategies, DDP."""

from __future__ import annotations

import csv
import os
import random
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from twinvae.config import ExperimentConfig, config_from_dict
from twinvae.data.imageset import ImageSet
from twinvae.errors import ConfigError
from twinvae.evaluation import predict as predict_module
from twinvae.training import steps as steps_module
from twinvae.training import trainer as trainer_module
from twinvae.training.checkpoint import load_checkpoint
from twinvae.training.data import TrainingData
from twinvae.training.device import Runtime
from twinvae.training.run_dir import RunDirectoryInUseError
from twinvae.training.steps import domain_threads, uses_domain_passes
from twinvae.training.trainer import (
    Trainer,
    TrainingDivergedError,
    TrainingWarning,
    train,
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
    # every epoch reseeds from epoch_seed, so checkpoints keep no RNG state and the global
    # generators' state at resume does not matter
    assert "rng" not in torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)
    with warnings.catch_warnings():  # the same runtime: no warning
        warnings.simplefilter("error", TrainingWarning)
        train(config, tmp_path / "resumed", data=tiny_data, progress=False, resume=True)
    assert _rows(tmp_path / "resumed") == _rows(tmp_path / "straight")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path: Path, tiny_data: TrainingData, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_loss = steps_module.twin_domain_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        if calls["n"] > 2 * 3:  # the second epoch goes wrong
            loss.total = loss.total * float("nan")
        return loss

    monkeypatch.setattr(steps_module, "twin_domain_loss", poisoned)
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


# ---- one writer per run folder, leftovers, resume ----------------------------------------------


def _train_in_thread(
    target: Callable[[], object], pause: threading.Event
) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``target`` on a thread until it reaches its pause (see `_pausing`)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as error:
            errors.append(error)
            pause.set()  # never leave the main thread waiting

    thread = threading.Thread(target=run)
    thread.start()
    assert pause.wait(60), "the first training never reached its pause"
    return thread, errors


def _pausing(
    real: Callable[..., Any], pause: threading.Event, go: threading.Event, at_call: int
) -> Callable[..., Any]:
    """``real``, made to wait for ``go`` at its ``at_call``-th call from the first thread."""
    calls = {"n": 0}
    owner: list[threading.Thread] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not owner:
            owner.append(threading.current_thread())
        if threading.current_thread() is owner[0]:
            calls["n"] += 1
            if calls["n"] == at_call:
                pause.set()
                assert go.wait(120)
        return real(*args, **kwargs)

    return wrapper


def test_a_second_training_into_a_busy_run_folder_is_refused(
    tmp_path: Path, tiny_data: TrainingData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs into one folder, the second started while the first prepares (the folder is
    still empty): the second is refused, the first's run stays whole."""
    run = tmp_path / "run"
    pause, go = threading.Event(), threading.Event()
    monkeypatch.setattr(trainer_module, "TwinVAE", _pausing(trainer_module.TwinVAE, pause, go, 1))
    thread, errors = _train_in_thread(
        lambda: train(_config(), run, data=tiny_data, progress=False), pause
    )
    try:
        with pytest.raises(RunDirectoryInUseError, match=rf"pid {os.getpid()}\b"):
            train(_config(), run, data=tiny_data, progress=False)
    finally:
        go.set()
        thread.join()
    assert not errors
    assert [int(r["epoch"]) for r in _rows(run)] == [1, 2, 3]


def test_resume_while_the_run_still_trains_is_refused(
    tmp_path: Path, tiny_data: TrainingData, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    pause, go = threading.Event(), threading.Event()
    # two augment calls per step, three steps per epoch: wait in the first step of epoch 2
    paused = _pausing(trainer_module.augment_batch, pause, go, 2 * 3 + 1)
    monkeypatch.setattr(trainer_module, "augment_batch", paused)
    thread, errors = _train_in_thread(
        lambda: train(_config(), run, data=tiny_data, progress=False), pause
    )
    try:
        assert (run / "last.pt").is_file()
        with pytest.raises(RunDirectoryInUseError, match="in use"):
            train(_config(), run, data=tiny_data, progress=False, resume=True)
    finally:
        go.set()
        thread.join()
    assert not errors
    assert [int(r["epoch"]) for r in _rows(run)] == [1, 2, 3]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(
    tmp_path: Path, tiny_data: TrainingData, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "augment_batch", broken)
    with pytest.raises(KeyboardInterrupt):
        train(_config(), tmp_path / "runs" / "run", data=tiny_data, progress=False)
    assert not (tmp_path / "runs").exists()


def test_resume_removes_temporary_files_of_a_killed_checkpoint_write(
    tmp_path: Path, tiny_data: TrainingData
) -> None:
    run = tmp_path / "run"
    train(_config(train={"epochs": 1}), run, data=tiny_data, progress=False)
    stale = run / ".last.pt.h1x0c9.tmp"  # what a kill inside atomic_writer leaves
    stale.write_bytes(b"half a checkpoint")
    train(_config(), run, data=tiny_data, progress=False, resume=True, resume_overrides=[])
    assert not stale.exists()


def _kill_in_epoch(monkeypatch: pytest.MonkeyPatch, call: int) -> Callable[[], None]:
    """Make the ``call``-th augment call raise KeyboardInterrupt; returns the undo."""
    real_augment = trainer_module.augment_batch
    calls = {"n": 0}

    def killed(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "augment_batch", killed)
    return lambda: monkeypatch.setattr(trainer_module, "augment_batch", real_augment)


@pytest.mark.filterwarnings("ignore::twinvae.training.errors.TrainingWarning")  # 3 val images
def test_resume_from_another_directory_finds_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's data path is relative to where training started, not to where it resumes."""
    from twinvae.data.writer import write_image_folder

    start, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    write_image_folder(_image_set(24, 5, labelled_share=0.5), start / "data" / "images")
    elsewhere.mkdir()
    config = _config(data={"natural": "data/images", "natural_only": True, "synthetic": None})
    monkeypatch.chdir(start)
    undo = _kill_in_epoch(monkeypatch, 3 + 1)  # one augment call per step: epoch 2, step 1
    with pytest.raises(KeyboardInterrupt):
        train(config, Path("runs/a"), progress=False)
    undo()
    monkeypatch.chdir(elsewhere)
    result = train(config, start / "runs" / "a", progress=False, resume=True)
    assert result.epochs_run == 3
    assert load_checkpoint(start / "runs" / "a" / "last.pt").config == config  # as it was given


def test_resume_can_extend_the_epochs(tmp_path: Path, tiny_data: TrainingData) -> None:
    """Three epochs, then two more on resume: the numbers of five epochs in one go."""
    train(_config(train={"epochs": 5}), tmp_path / "straight", data=tiny_data, progress=False)
    run = tmp_path / "extended"
    train(_config(), run, data=tiny_data, progress=False)
    with warnings.catch_warnings():  # a constant schedule: nothing is stretched
        warnings.simplefilter("error", TrainingWarning)
        result = train(
            None,
            run,
            data=tiny_data,
            progress=False,
            resume=True,
            resume_overrides=["train.epochs=5"],
        )
    assert [row["epoch"] for row in result.history] == [4, 5]
    assert _rows(run) == _rows(tmp_path / "straight")
    assert load_checkpoint(run / "last.pt").config.train.epochs == 5
    assert "epochs: 5" in (run / "config.yaml").read_text()


def test_more_epochs_on_resume_warn_when_they_stretch_the_schedule(
    tmp_path: Path, tiny_data: TrainingData
) -> None:
    run = tmp_path / "run"
    train(
        _config(train={"epochs": 1}, optim={"schedule": "cosine"}),
        run,
        data=tiny_data,
        progress=False,
    )
    with pytest.warns(TrainingWarning, match="train.epochs 1 -> 2 spreads the learning-rate"):
        train(
            None,
            run,
            data=tiny_data,
            progress=False,
            resume=True,
            resume_overrides=["train.epochs=2"],
        )


def test_resume_refuses_overrides_other_than_epochs_and_patience(
    tmp_path: Path, tiny_data: TrainingData
) -> None:
    run = tmp_path / "run"
    train(_config(train={"epochs": 2}), run, data=tiny_data, progress=False)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"optim\.lr.*train\.epochs"):
        train(
            _config(),
            run,
            data=tiny_data,
            progress=False,
            resume=True,
            resume_overrides=["train.epochs=3", "optim.lr=0.1"],
        )
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        train(
            _config(),
            run,
            data=tiny_data,
            progress=False,
            resume=True,
            resume_overrides=["train.epochs=1"],
        )
    assert (run / "last.pt").read_bytes() == before


def test_resuming_a_complete_run_trains_nothing(tmp_path: Path, tiny_data: TrainingData) -> None:
    run = tmp_path / "run"
    first = train(_config(train={"epochs": 2}), run, data=tiny_data, progress=False)
    again = train(_config(), run, data=tiny_data, progress=False, resume=True)
    assert again.already_complete and not first.already_complete
    assert again.history == [] and again.epochs_run == 2
    assert again.best_epoch == first.best_epoch
    assert again.best_val_mae == pytest.approx(first.best_val_mae)
    assert len(_rows(run)) == 2


def test_a_tiny_validation_split_is_reported(tmp_path: Path, tiny_data: TrainingData) -> None:
    few = replace(tiny_data, natural_val=_image_set(3, 1, labelled_share=0.67))
    with pytest.warns(TrainingWarning, match=r"validation holds 2 labelled images.*val_fraction"):
        train(_config(train={"epochs": 1}), tmp_path / "few", data=few, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingWarning)
        train(_config(train={"epochs": 1}), tmp_path / "enough", data=tiny_data, progress=False)


def test_best_checkpoint_holds_only_what_evaluation_and_transfer_need(
    tmp_path: Path, tiny_data: TrainingData
) -> None:
    run = tmp_path / "run"
    train(_config(train={"epochs": 1}), run, data=tiny_data, progress=False)
    best = torch.load(run / "best.pt", weights_only=True)
    last = torch.load(run / "last.pt", weights_only=True)
    assert best.get("optimizer") is None and best.get("scheduler") is None
    assert last["optimizer"] is not None and last["scheduler"] is not None
    assert "scaler" not in best["trainer"] and best["trainer"]["best_mae"] > 0
    assert (run / "best.pt").stat().st_size < (run / "last.pt").stat().st_size
    for name, tensor in best["model"].items():
        assert torch.equal(tensor, last["model"][name])
    # transfer (and with it evaluation and export, which read the same fields) starts from it
    config = _config(train={"epochs": 1}, transfer={"from_checkpoint": str(run / "best.pt")})
    train(config, tmp_path / "transfer", data=tiny_data, progress=False)


def test_checkpoints_record_the_runtime_and_resume_says_what_differs(
    tmp_path: Path, tiny_data: TrainingData, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    undo = _kill_in_epoch(monkeypatch, 2 * 3 + 1)
    with pytest.raises(KeyboardInterrupt):
        train(_config(train={"precision": "fp32"}), run, data=tiny_data, progress=False)
    undo()
    payload = torch.load(run / "last.pt", weights_only=True)
    recorded = payload["runtime"]
    assert recorded["precision"] == "fp32" and recorded["device"] == "cpu"
    assert recorded["threads"] == str(torch.get_num_threads())
    assert {"cpu_capability", "cpu_kernels", "step", "torch"} <= recorded.keys()
    assert payload["runtime"] == torch.load(run / "best.pt", weights_only=True)["runtime"]
    payload["runtime"] = {**recorded, "precision": "bf16", "cpu_kernels": "off"}
    torch.save(payload, run / "last.pt")
    with pytest.warns(TrainingWarning, match=r"precision bf16 -> fp32.*cpu_kernels off ->"):
        train(_config(), run, data=tiny_data, progress=False, resume=True)


def test_progress_is_reported_through_twinvae_progress(
    tmp_path: Path, tiny_data: TrainingData
) -> None:
    from contextlib import contextmanager

    from twinvae.progress import use_display

    seen: dict[str, Any] = {"descriptions": [], "steps": 0}

    class Recorder:
        def advance(self, steps: int = 1) -> None:
            seen["steps"] += steps

        def describe(self, description: str) -> None:
            seen["descriptions"].append(description)

    @contextmanager
    def display(description: str, total: int | None) -> Iterator[Recorder]:
        seen["total"] = total
        yield Recorder()

    with use_display(display):
        train(_config(), tmp_path / "run", data=tiny_data)
    assert seen["total"] == seen["steps"] == 3 * 3
    assert seen["descriptions"] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]


def test_the_training_package_does_not_import_the_cli() -> None:
    import ast

    def imported(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                names.add(node.module)
        return names

    package = Path(trainer_module.__file__).parent
    offenders = [
        path.name
        for path in [*package.glob("*.py"), Path(predict_module.__file__)]
        if any(name.startswith("twinvae.cli") for name in imported(path))
    ]
    assert offenders == []
