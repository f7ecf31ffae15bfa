"""The Twin-VAE training loop: a short loop over parts with one job each.

- the run folder (`run_dir.RunDirectory`): lock, config.yaml, checkpoints, clean-up;
- the metrics log (`metrics_log.MetricsLog`): metrics.csv;
- the step strategy (`steps`): forward and backward of one step (plain/AMP, DDP, threaded CPU);
- callbacks (`callbacks`): progress and whatever else a caller wants to hear about.

`train` is the usual entry point: it opens the run folder (new or resumed) for the whole run.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twinvae.accel import accelerate
from twinvae.config import ExperimentConfig, OptimConfig, apply_overrides, config_from_dict
from twinvae.errors import ConfigError
from twinvae.evaluation.metrics import count_metrics
from twinvae.evaluation.predict import predict_counts
from twinvae.models.twin_vae import TwinVAE
from twinvae.training.augment import augment_batch
from twinvae.training.callbacks import Callbacks, ProgressBar, TrainingCallback
from twinvae.training.checkpoint import Checkpoint
from twinvae.training.data import (
    NaturalSampler,
    SyntheticSource,
    TrainingData,
    prepare_data,
    to_tensor,
    with_paths_from,
)
from twinvae.training.device import setup_runtime, teardown_runtime
from twinvae.training.errors import TrainingDivergedError, TrainingWarning
from twinvae.training.metrics_log import METRIC_COLUMNS, MetricsLog
from twinvae.training.run_dir import RunDirectory, is_writer_process
from twinvae.training.runtime_record import describe_runtime, runtime_differences
from twinvae.training.steps import DomainBatch, DomainPasses, make_step
from twinvae.training.transfer import apply_trainable, trainable_groups

__all__ = [
    "METRIC_COLUMNS",
    "RESUME_OVERRIDES",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "TrainingWarning",
    "predict_counts",  # moved to twinvae.evaluation.predict; kept here for older imports
    "resumed_config",
    "train",
]

# the config values a resume may change: how long the run goes on, nothing about how it trains
RESUME_OVERRIDES = ("train.epochs", "train.early_stopping_patience")

# fewer labelled validation images than this make "best epoch" mostly a matter of chance
MIN_VALIDATION_IMAGES = 10


@dataclass
class TrainResult:
    run_dir: Path
    best_val_mae: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    already_complete: bool = False  # a resume found nothing left to train

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "last.pt"


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """All parameters go to the optimiser; frozen ones (no grad) are simply skipped by it."""
    options: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "radam":
        return torch.optim.RAdam(model.parameters(), **options)
    # fused Adam(W): one kernel over all tensors, much faster per step on the CPU; the same
    # update up to float rounding (RAdam has no fused kernel)
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(model.parameters(), fused=True, **options)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: linear warm-up, then constant, cosine or one-cycle."""
    warmup = config.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "cosine":
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if config.schedule == "onecycle":
            if progress < 0.3:
                return 0.1 + 0.9 * progress / 0.3
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_seed(seed: int, epoch: int, rank: int = 0, stream: int = 0) -> int:
    """Every epoch draws from its own seed, so a resumed run replays it exactly (and no
    checkpoint needs to keep an RNG state)."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1)[0])


def resumed_config(checkpoint: Checkpoint, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config a resume continues with: the run's own, with only `RESUME_OVERRIDES`
    changed (``key=value`` as for ``--set``)."""
    saved = checkpoint.config
    if not overrides:
        return saved
    refused = [item for item in overrides if item.split("=", 1)[0].strip() not in RESUME_OVERRIDES]
    if refused:
        raise ConfigError(
            f"--set {', '.join(refused)}: a resumed run keeps its config; on --resume only "
            f"{' and '.join(RESUME_OVERRIDES)} can change. To train with other settings, start "
            "a new run (or a transfer from RUN/last.pt)"
        )
    data = apply_overrides(saved.model_dump(mode="json"), list(overrides))
    config = config_from_dict(data, origin="--set on --resume")
    done = checkpoint.epoch + 1
    if config.train.epochs < done:
        raise ConfigError(
            f"--set train.epochs={config.train.epochs}: the run has already trained {done} "
            f"epoch{'s' if done != 1 else ''}; give at least {done}"
        )
    return config


def run_is_complete(checkpoint: Checkpoint, config: ExperimentConfig) -> bool:
    """After the last epoch, or when early stopping ended the run (under ``config``)."""
    if checkpoint.epoch + 1 >= config.train.epochs:
        return True
    patience = config.train.early_stopping_patience
    waited = int(checkpoint.trainer_state.get("epochs_since_best", 0))
    return patience is not None and waited >= patience


class Trainer:
    """Trains one Twin-VAE run; see `train` for the usual entry point.

    ``run_dir`` is an open `RunDirectory`, or a path: then the trainer opens it as a new run
    and closes it when `fit` ends (or at `close`). ``resume_from`` is the run's last.pt, with
    ``config`` the config to continue with (`resumed_config`).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: Path | RunDirectory,
        *,
        resume_from: Checkpoint | None = None,
        progress: bool = True,
        data: TrainingData | None = None,
        callbacks: Sequence[TrainingCallback] = (),
    ) -> None:
        self._owns_run = not isinstance(run_dir, RunDirectory)
        if isinstance(run_dir, RunDirectory):
            self.run = run_dir
        elif resume_from is not None:
            self.run = RunDirectory.resume(Path(run_dir), writer=is_writer_process())
        else:
            self.run = RunDirectory.new(Path(run_dir), writer=is_writer_process())
        try:
            self._build(config, resume_from, progress, data, callbacks)
        except BaseException:
            self._close_run(failed=True)
            raise

    @property
    def run_dir(self) -> Path:
        return self.run.path

    # ---- set-up ---------------------------------------------------------------------------

    def _build(
        self,
        config: ExperimentConfig,
        resume_from: Checkpoint | None,
        progress: bool,
        data: TrainingData | None,
        callbacks: Sequence[TrainingCallback],
    ) -> None:
        self.start_epoch = 0
        self.best_mae = math.inf
        self.best_epoch = -1
        self.epochs_since_best = 0
        self.config = config
        self.runtime = setup_runtime(config.train)
        self.metrics = MetricsLog(self.run.metrics_path)
        # relative data paths refer to where the run started (a resume may run elsewhere)
        self.working_dir = os.getcwd()
        data_config = config.data
        if resume_from is not None:
            self.working_dir = resume_from.working_dir or self.working_dir
            data_config = with_paths_from(config.data, Path(self.working_dir))
        torch.manual_seed(config.train.seed)
        self.model = TwinVAE(config.model)
        accelerate(self.model, self.runtime.device)  # same function, faster (twinvae.accel)
        if config.transfer is not None and config.transfer.from_checkpoint and resume_from is None:
            self._load_transfer_source(config.transfer.from_checkpoint)
        self.model.to(self.runtime.device)
        if config.train.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.data = data if data is not None else prepare_data(data_config, config.train.seed)
        chosen = self.data.data_config
        if chosen is not None:  # the generator modality chosen for the images: into config.yaml
            update = {"synthetic_generator": chosen.synthetic_generator}
            config = config.model_copy(update={"data": config.data.model_copy(update=update)})
            self.config = config
        self._check_validation_size()
        self.sampler = NaturalSampler(
            self.data.natural_train,
            config.data.labelled_fraction,
            targets=self.data.natural_targets,
            balance_counts=config.data.balance_counts,
        )
        if resume_from is None and (config.transfer is None or not config.transfer.from_checkpoint):
            self.model.regressor.start_at(_mean_label(self.data))
        self.synthetic = (
            None
            if config.data.natural_only
            else SyntheticSource(
                config.data, self.data.synthetic, config.train.seed, self.data.synthetic_background
            )
        )
        n_natural = len(self.data.natural_train)
        self.steps_per_epoch = config.train.steps_per_epoch or max(
            1, n_natural // (config.train.batch_size * self.runtime.world_size)
        )
        self.optimizer = make_optimizer(self.model, config.optim)
        self.scheduler = make_scheduler(
            self.optimizer,
            config.optim,
            config.train.epochs * self.steps_per_epoch,
            self.steps_per_epoch,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.runtime.precision == "fp16")
        self._trainable: set[str] | None = None
        self._frozen_modules: list[nn.Module] = []
        self.step = make_step(
            self.model, config, self.runtime, self.scaler, self.synthetic is not None
        )
        self.runtime_record = describe_runtime(self.runtime, self.model, self.step.description)
        main = [ProgressBar()] if progress and self.runtime.is_main else []
        self.callbacks = Callbacks([*main, *callbacks])
        if resume_from is not None:
            self._restore(resume_from)
        elif self.runtime.is_main:
            self.run.write_config(config)

    @property
    def domain_passes(self) -> DomainPasses | None:
        """The step strategy when it is the CPU's `DomainPasses` (else None)."""
        return self.step if isinstance(self.step, DomainPasses) else None

    def _load_transfer_source(self, source: str) -> None:
        """A checkpoint, bundle or zoo model (`training.sources`); one with only the counting
        path fills that part and allows only natural-only runs."""
        from twinvae.training.sources import (
            check_transfer_plan,
            resolve_transfer_source,
            warn_if_partial,
        )

        resolved = resolve_transfer_source(source)
        if resolved.model != self.config.model:
            raise ConfigError(
                f"{source}: its model config differs from this run's; set model: to the source's"
            )
        check_transfer_plan(resolved, self.config)
        warn_if_partial(resolved)
        resolved.load_into(self.model)
        if self.config.transfer is not None and self.config.transfer.reset_regressor:
            for module in self.model.regressor.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()

    def _check_validation_size(self) -> None:
        """Warn when the validation split is too small to tell a best epoch from chance."""
        labelled = int(self.data.natural_val.labelled.sum())
        if labelled >= MIN_VALIDATION_IMAGES or not self.runtime.is_main:
            return
        total = labelled + int(self.data.natural_train.labelled.sum())
        warnings.warn(
            TrainingWarning(
                f"validation holds {labelled} labelled images (of {total} labelled): best.pt is "
                "chosen on their MAE, which is mostly chance with so few. For a checkpoint "
                f"chosen on more images raise data.val_fraction (now "
                f"{self.config.data.val_fraction:g}), or use last.pt instead of best.pt"
            ),
            stacklevel=2,
        )

    def _restore(self, checkpoint: Checkpoint) -> None:
        self.model.load_state_dict(checkpoint.model_state)
        if checkpoint.optimizer_state is not None:
            self.optimizer.load_state_dict(checkpoint.optimizer_state)
        if checkpoint.scheduler_state is not None:
            self.scheduler.load_state_dict(checkpoint.scheduler_state)
        state = checkpoint.trainer_state
        self.start_epoch = checkpoint.epoch + 1
        self.best_mae = float(state.get("best_mae", math.inf))
        self.best_epoch = int(state.get("best_epoch", -1))
        self.epochs_since_best = int(state.get("epochs_since_best", 0))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if not self.runtime.is_main:
            return
        self.metrics.keep_epochs(checkpoint.epoch + 1)
        if self.config != checkpoint.config:  # resumed with more epochs (or patience)
            self.run.write_config(self.config)
            self._warn_if_stretched(checkpoint.config)
        differences = runtime_differences(checkpoint.runtime, self.runtime_record)
        if differences:
            warnings.warn(
                TrainingWarning(
                    f"{self.run_dir}: resumed on another runtime than it trained on: "
                    f"{'; '.join(differences)}. The remaining epochs will not repeat the numbers "
                    "of an uninterrupted run"
                ),
                stacklevel=2,
            )

    def _warn_if_stretched(self, trained: ExperimentConfig) -> None:
        """More epochs on resume spread epoch-dependent plans over the new length."""
        before, after = trained.train.epochs, self.config.train.epochs
        stretched = [
            name
            for name, applies in (
                ("the learning-rate schedule", self.config.optim.schedule != "constant"),
                (
                    "the thaw stages",
                    self.config.transfer is not None and self.config.transfer.strategy == "thaw",
                ),
            )
            if applies
        ]
        if before != after and stretched:
            warnings.warn(
                TrainingWarning(
                    f"{self.run_dir}: train.epochs {before} -> {after} spreads "
                    f"{' and '.join(stretched)} over {after} epochs from here on; the run will "
                    f"not equal one trained for {after} epochs from the start"
                ),
                stacklevel=2,
            )

    def _set_trainable(self, epoch: int) -> None:
        groups = trainable_groups(self.config.transfer, epoch, self.config.train.epochs)
        if groups == self._trainable:
            return
        self._frozen_modules = apply_trainable(self.model, groups)
        self._trainable = groups
        self.step.trainable_changed()

    def stop_domain_threads(self) -> None:
        """End the step's threads (`close` does); later steps run the domain passes in turn."""
        self.step.close()

    def close(self, *, failed: bool = False) -> None:
        """End the step's threads and the runtime; release the run folder if this trainer
        opened it. `fit` closes at its end."""
        try:
            self.stop_domain_threads()
            teardown_runtime(self.runtime)
        finally:
            self._close_run(failed=failed)

    def _close_run(self, *, failed: bool) -> None:
        if self._owns_run:
            self.run.close(failed=failed)

    # ---- training -------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg = self.config
        history: list[dict[str, Any]] = []
        stopped_early = False
        epoch = self.start_epoch - 1
        try:
            self.callbacks.on_fit_start(self.start_epoch, cfg.train.epochs, self.steps_per_epoch)
            for epoch in range(self.start_epoch, cfg.train.epochs):
                self.callbacks.on_epoch_start(epoch, cfg.train.epochs)
                row = self._train_epoch(epoch, self.callbacks.on_step)
                row.update(self._validate(epoch))
                history.append(row)
                improved = self._track_best(row)
                self._save(epoch, row, improved)
                self.callbacks.on_epoch_end(row)
                patience = cfg.train.early_stopping_patience
                if patience is not None and self.epochs_since_best >= patience:
                    stopped_early = True
                    break
        except BaseException:
            self.callbacks.on_fit_end()
            self.close(failed=True)
            raise
        self.callbacks.on_fit_end()
        self.close()
        return TrainResult(
            run_dir=self.run_dir,
            best_val_mae=self.best_mae,
            best_epoch=self.best_epoch,
            epochs_run=epoch + 1,
            stopped_early=stopped_early,
            history=history,
        )

    def _train_epoch(self, epoch: int, on_step: Any) -> dict[str, Any]:
        cfg, runtime = self.config, self.runtime
        self._set_trainable(epoch)
        seed = epoch_seed(cfg.train.seed, epoch, runtime.rank)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        augment_rng = torch.Generator().manual_seed(seed)
        self.model.train()
        for module in self._frozen_modules:
            module.eval()  # frozen means a fixed function: no dropout, no BatchNorm updates
        rec_weight = cfg.loss.rec_weight * cfg.loss.rec_decay**epoch
        regressor_on = epoch >= cfg.loss.regressor_start_epoch
        batch = cfg.train.batch_size
        synthetic_batch = max(1, round(batch * cfg.data.synthetic_ratio))
        sums: dict[str, float] = {}
        images_seen = 0
        started = time.perf_counter()
        natural_set = self.data.natural_train
        for step in range(self.steps_per_epoch):
            index = self.sampler.sample(batch, rng)
            natural = to_tensor(natural_set.images[index], runtime.device, cfg.train.channels_last)
            natural = augment_batch(natural, cfg.augment, augment_rng)
            natural_counts = torch.from_numpy(self._natural_targets(index)).to(runtime.device)
            batches: list[DomainBatch] = [("natural", natural, natural_counts)]
            if self.synthetic is not None:
                syn_images, syn_counts = self.synthetic.batch(
                    synthetic_batch, (epoch, step, runtime.rank), rng
                )
                synthetic = augment_batch(
                    to_tensor(syn_images, runtime.device, cfg.train.channels_last),
                    cfg.augment,
                    augment_rng,
                )
                synthetic_counts = torch.from_numpy(syn_counts.astype(np.float32)).to(
                    runtime.device
                )
                batches.append(("synthetic", synthetic, synthetic_counts))
            self.optimizer.zero_grad(set_to_none=True)
            loss, terms = self.step.forward_backward(batches, rec_weight, regressor_on)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss.item()} in epoch {epoch + 1}, step {step + 1}; stopped. "
                    f"{self._kept_checkpoint()} "
                    "Try a lower optim.lr, optim.grad_clip or train.precision=fp32."
                )
            if cfg.optim.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            sums["loss"] = sums.get("loss", 0.0) + float(loss)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            images_seen += sum(len(images) for _, images, _ in batches)
            on_step()
        seconds = time.perf_counter() - started
        row: dict[str, Any] = {"epoch": epoch + 1}
        for key in METRIC_COLUMNS[1:8]:
            row[key] = sums[key] / self.steps_per_epoch if key in sums else ""
        row.update(
            lr=self.optimizer.param_groups[0]["lr"],
            trainable="+".join(sorted(self._trainable or ())),
            seconds=round(seconds, 3),
            images_per_second=round(images_seen * runtime.world_size / seconds, 1),
        )
        return row

    def _natural_targets(self, index: np.ndarray) -> np.ndarray:
        """The batch's counts (N,), or with pseudo-labels its targets and weights (N, 2)."""
        data = self.data
        if data.natural_targets is None or data.natural_weights is None:
            return data.natural_train.counts[index].astype(np.float32)
        return np.stack([data.natural_targets[index], data.natural_weights[index]], axis=1)

    def _kept_checkpoint(self) -> str:
        if self.run.last_checkpoint.exists():
            return f"The last good checkpoint is kept in {self.run.last_checkpoint}."
        return "No epoch had finished, so there is no checkpoint to keep."

    def _validate(self, epoch: int) -> dict[str, Any]:
        cfg = self.config
        val = self.data.natural_val.labelled_only()
        result: dict[str, Any] = {
            "val_mae": "",
            "val_mre": "",
            "val_accuracy": "",
            "synthetic_val_mae": "",
        }
        if (epoch + 1) % cfg.train.val_every and epoch + 1 != cfg.train.epochs:
            return result
        predictions = predict_counts(self.model, val.images, self.runtime, tta=cfg.train.tta)
        metrics = count_metrics(predictions, val.counts)
        result.update(
            val_mae=metrics["mae"], val_mre=metrics["mre"], val_accuracy=metrics["accuracy"]
        )
        if self.data.synthetic_val is not None and not cfg.data.natural_only:
            syn = self.data.synthetic_val
            syn_pred = predict_counts(self.model, syn.images, self.runtime, domain="synthetic")
            result["synthetic_val_mae"] = count_metrics(syn_pred, syn.counts)["mae"]
        return result

    def _track_best(self, row: dict[str, Any]) -> bool:
        """True when this epoch is the best so far; patience resets only on a clear gain."""
        mae = row["val_mae"]
        if mae == "" or mae >= self.best_mae:
            self.epochs_since_best += 1
            return False
        if mae < self.best_mae - self.config.train.early_stopping_min_delta:
            self.epochs_since_best = 0
        else:
            self.epochs_since_best += 1
        self.best_mae, self.best_epoch = mae, row["epoch"]
        return True

    def _save(self, epoch: int, row: dict[str, Any], improved: bool) -> None:
        if not self.runtime.is_main:
            return
        self.metrics.append(row)
        metrics = {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
        checkpoint = Checkpoint(
            config=self.config,
            model_state={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            epoch=epoch,
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            metrics=metrics,
            trainer_state={
                "best_mae": self.best_mae,
                "best_epoch": self.best_epoch,
                "epochs_since_best": self.epochs_since_best,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            },
            runtime=self.runtime_record,
            working_dir=self.working_dir,
        )
        self.run.save_checkpoints(checkpoint, best=improved)


def _mean_label(data: TrainingData) -> float:
    """Mean count of the labelled natural training images (0 when none is labelled)."""
    train = data.natural_train
    counts = train.counts[train.labelled]
    return float(counts.mean()) if counts.size else 0.0


def _complete_result(
    run: RunDirectory, checkpoint: Checkpoint, config: ExperimentConfig
) -> TrainResult:
    state = checkpoint.trainer_state
    epochs_run = checkpoint.epoch + 1
    return TrainResult(
        run_dir=run.path,
        best_val_mae=float(state.get("best_mae", math.inf)),
        best_epoch=int(state.get("best_epoch", -1)),
        epochs_run=epochs_run,
        stopped_early=epochs_run < config.train.epochs,
        already_complete=True,
    )


def train(
    config: ExperimentConfig | None,
    run_dir: Path,
    *,
    resume: bool = False,
    resume_overrides: Sequence[str] = (),
    progress: bool = True,
    data: TrainingData | None = None,
    callbacks: Sequence[TrainingCallback] = (),
) -> TrainResult:
    """Train a new run in ``run_dir`` (config.yaml, metrics.csv, last.pt, best.pt), or resume
    it from its last.pt: then the run's own config is used (``config`` is ignored), changed
    only by ``resume_overrides`` (`RESUME_OVERRIDES`); a complete run trains nothing and comes
    back with ``already_complete``. The folder stays locked until the run ends."""
    writer = is_writer_process()
    if not resume:
        if config is None:
            raise ConfigError("a new run needs a config")
        with RunDirectory.new(Path(run_dir), writer=writer) as run:
            trainer = Trainer(config, run, progress=progress, data=data, callbacks=callbacks)
            return trainer.fit()
    with RunDirectory.resume(Path(run_dir), writer=writer) as run:
        checkpoint = run.load_last()
        resumed = resumed_config(checkpoint, resume_overrides)
        if run_is_complete(checkpoint, resumed):
            return _complete_result(run, checkpoint, resumed)
        trainer = Trainer(
            resumed,
            run,
            resume_from=checkpoint,
            progress=progress,
            data=data,
            callbacks=callbacks,
        )
        return trainer.fit()
