"""The Twin-VAE training loop: run folder, metrics.csv, atomic checkpoints, exact resume."""

from __future__ import annotations

import csv
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from twinvae.config import ExperimentConfig, LossConfig, OptimConfig
from twinvae.errors import CheckpointError, ConfigError, TwinVAEError
from twinvae.evaluation.metrics import count_metrics
from twinvae.models.domain_pass import RunningUpdate, apply_running_updates, independent_pass
from twinvae.models.twin_vae import DomainName, TwinVAE
from twinvae.training.augment import augment_batch, dihedral_views
from twinvae.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from twinvae.training.data import (
    NaturalSampler,
    SyntheticSource,
    TrainingData,
    prepare_data,
    to_tensor,
)
from twinvae.training.device import Runtime, setup_runtime, teardown_runtime
from twinvae.training.losses import DomainLoss, twin_domain_loss
from twinvae.training.transfer import apply_trainable, trainable_groups

METRIC_COLUMNS = [
    "epoch",
    "loss",
    "natural_rec",
    "natural_reg",
    "natural_kl",
    "synthetic_rec",
    "synthetic_reg",
    "synthetic_kl",
    "val_mae",
    "val_mre",
    "val_accuracy",
    "synthetic_val_mae",
    "lr",
    "trainable",
    "seconds",
    "images_per_second",
]


class TrainingDivergedError(TwinVAEError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    best_val_mae: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "last.pt"


DomainBatch = tuple[DomainName, torch.Tensor, torch.Tensor]  # domain, images, counts


def domain_loss(
    model: TwinVAE,
    loss_config: LossConfig,
    batch: DomainBatch,
    rec_weight: float,
    regressor_on: bool,
) -> DomainLoss:
    """One domain's forward pass and twin loss (decoding only when a loss uses it)."""
    domain, images, counts = batch
    decode = rec_weight > 0 and not loss_config.decoder_off
    output = model(images, domain, sample=True, decode=decode)
    return twin_domain_loss(
        output,
        images,
        counts,
        loss_config,
        rec_weight=rec_weight if decode else 0.0,
        regressor_on=regressor_on,
    )


def summed_losses(
    batches: list[DomainBatch], losses: list[DomainLoss]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and the unweighted terms by name (``natural_rec``, ...)."""
    total = sum((loss.total for loss in losses[1:]), start=losses[0].total)
    terms: dict[str, torch.Tensor] = {}
    for (domain, _, _), loss in zip(batches, losses, strict=True):
        terms[f"{domain}_rec"], terms[f"{domain}_reg"] = loss.rec, loss.reg
        terms[f"{domain}_kl"] = loss.kl
    return total, terms


class TwinStep(nn.Module):
    """Both domains' forward passes and losses in one call (one forward per backward, for DDP)."""

    def __init__(self, model: TwinVAE, config: ExperimentConfig) -> None:
        super().__init__()
        self.model = model
        self.loss_config = config.loss

    def forward(
        self, batches: list[DomainBatch], rec_weight: float, regressor_on: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and its unweighted terms (detached)."""
        losses = [
            domain_loss(self.model, self.loss_config, batch, rec_weight, regressor_on)
            for batch in batches
        ]
        return summed_losses(batches, losses)


class DomainPasses:
    """The training step of a one-process CPU run: each domain's forward and backward pass as
    an `independent_pass`, on two threads side by side when ``threads`` is given, else one
    after the other. Either way the passes draw from their own generators, seeded in order from
    torch's global one, and their batch-norm statistics are applied in domain order, so the
    numbers do not depend on the threads' timing (without threads they are the same up to the
    rounding of oneDNN, which depends on its thread count).

    Side by side is faster on the CPU: oneDNN's kernels gain only 1.6 - 1.9x from a second
    thread, so two passes at half the threads each keep the cores busier
    (benchmarks/README.md). The domains share parameters only as leaves, whose gradients
    autograd adds under a lock (a + b, the same in either order).
    """

    def __init__(
        self,
        model: TwinVAE,
        config: ExperimentConfig,
        runtime: Runtime,
        threads: ThreadPoolExecutor | None,
    ) -> None:
        self.model = model
        self.loss_config = config.loss
        self.runtime = runtime
        self.threads = threads

    def run(
        self, batches: list[DomainBatch], rec_weight: float, regressor_on: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of every batch; returns the total loss and its terms."""
        seeds = [int(seed) for seed in torch.randint(0, 2**62, (len(batches),))]
        jobs = [
            (batch, seed, rec_weight, regressor_on)
            for batch, seed in zip(batches, seeds, strict=True)
        ]
        if self.threads is not None and len(jobs) == 2:
            running = [self.threads.submit(self._pass, *job) for job in jobs]
            wait(running)  # both finish before anything (an error included) goes on
            results = [future.result() for future in running]
        else:
            results = [self._pass(*job) for job in jobs]
        for _, updates in results:
            apply_running_updates(updates)
        losses = [loss for loss, _ in results]
        total, terms = summed_losses(batches, losses)
        return total.detach(), terms

    def _pass(
        self, batch: DomainBatch, seed: int, rec_weight: float, regressor_on: bool
    ) -> tuple[DomainLoss, list[RunningUpdate]]:
        generator = torch.Generator().manual_seed(seed)
        with self.runtime.autocast(), independent_pass(generator) as updates:
            loss = domain_loss(self.model, self.loss_config, batch, rec_weight, regressor_on)
        # a domain whose layers are all frozen (a thaw stage) has nothing to back-propagate
        if loss.total.requires_grad:
            loss.total.backward()
        return loss, updates


def domain_threads(
    runtime: Runtime, config: ExperimentConfig, two_domains: bool
) -> ThreadPoolExecutor | None:
    """Two threads with half the torch threads each for `DomainPasses`, or None where they
    do not apply (``train.parallel_domains`` off, one domain, fewer than two threads)."""
    threads = torch.get_num_threads()
    if not (config.train.parallel_domains and two_domains and threads >= 2):
        return None
    return ThreadPoolExecutor(
        2,
        thread_name_prefix="twinvae-domain",
        initializer=torch.set_num_threads,  # per OS thread; the main thread keeps its count
        initargs=(threads // 2,),
    )


def uses_domain_passes(runtime: Runtime) -> bool:
    """Whether a run trains with `DomainPasses`: on the CPU, in one process. DDP needs one
    forward per backward (`TwinStep`); on CUDA dropout draws from the device's generator."""
    return runtime.device.type == "cpu" and not runtime.distributed and runtime.precision != "fp16"


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """All parameters go to the optimiser; frozen ones (no grad) are simply skipped by it."""
    options: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "radam":
        return torch.optim.RAdam(model.parameters(), **options)
    # fused Adam(W): one kernel over all tensors, 3x faster per step on the CPU; the same update
    # up to float rounding (RAdam has no fused kernel)
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
    """Every epoch draws from its own seed, so a resumed run replays it exactly."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1)[0])


def _rng_snapshot() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.asarray(cast(tuple[Any, ...], np.random.get_state())[1]).tolist(),
        "python": list(random.getstate()[1]),
    }


@torch.no_grad()
def predict_counts(
    model: TwinVAE,
    images: np.ndarray,
    runtime: Runtime,
    *,
    domain: str = "natural",
    batch_size: int = 256,
    tta: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """Deterministic counts (mu, eval mode) for uint8 (N, H, W) images."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_tensor(images[start : start + batch_size], runtime.device, channels_last)
        views = dihedral_views(batch) if tta else [batch]
        with runtime.autocast():
            counts = torch.stack([model.count(v, domain).float() for v in views]).mean(0)  # type: ignore[arg-type]
        out.append(counts.cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


class Trainer:
    """Trains one Twin-VAE run in ``run_dir``; see `train` for the usual entry point."""

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        progress: bool = True,
        data: TrainingData | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.start_epoch = 0
        self.best_mae = math.inf
        self.best_epoch = -1
        self.epochs_since_best = 0
        resume_from: Checkpoint | None = None
        if resume:
            resume_from = load_checkpoint(self.run_dir / "last.pt")
            config = resume_from.config
        else:
            _prepare_run_dir(self.run_dir)
        self.config = config
        self.runtime = setup_runtime(config.train)
        torch.manual_seed(config.train.seed)
        self.model = TwinVAE(config.model)
        self.model.fast_kernels = True  # same function, faster training (see twin_vae.py)
        if config.transfer is not None and config.transfer.from_checkpoint and resume_from is None:
            self._load_transfer_source(config.transfer.from_checkpoint)
        self.model.to(self.runtime.device)
        if config.train.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.data = data if data is not None else prepare_data(config.data, config.train.seed)
        self.sampler = NaturalSampler(self.data.natural_train, config.data.labelled_fraction)
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
        self.step_module: nn.Module = TwinStep(self.model, config)
        self.domain_passes: DomainPasses | None = None
        if uses_domain_passes(self.runtime):
            threads = domain_threads(self.runtime, config, self.synthetic is not None)
            self.domain_passes = DomainPasses(self.model, config, self.runtime, threads)
        if resume_from is not None:
            self._restore(resume_from)
        elif self.runtime.is_main:
            config.save(self.run_dir / "config.yaml")

    # ---- set-up helpers -------------------------------------------------------------------

    def _load_transfer_source(self, source: str) -> None:
        checkpoint = load_checkpoint(source)
        if checkpoint.config.model != self.config.model:
            raise ConfigError(
                f"{source}: its model config differs from this run's; set model: to the source's"
            )
        self.model.load_state_dict(checkpoint.model_state)
        if self.config.transfer is not None and self.config.transfer.reset_regressor:
            for module in self.model.regressor.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()

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
        _truncate_metrics(self.run_dir / "metrics.csv", checkpoint.epoch)

    def _set_trainable(self, epoch: int) -> None:
        groups = trainable_groups(self.config.transfer, epoch, self.config.train.epochs)
        if groups == self._trainable:
            return
        self._frozen_modules = apply_trainable(self.model, groups)
        self._trainable = groups
        base = TwinStep(self.model, self.config)
        if self.runtime.distributed:
            # re-wrapped whenever the trainable parameters change (DDP fixes them at wrap time)
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            self.step_module = DistributedDataParallel(
                base, device_ids=device_ids, find_unused_parameters=True
            )
        else:
            self.step_module = base

    def stop_domain_threads(self) -> None:
        """End the domain threads (`fit` does at its end); later steps run the passes in turn
        (the same numbers up to oneDNN's rounding, which depends on its thread count)."""
        if self.domain_passes is not None and self.domain_passes.threads is not None:
            self.domain_passes.threads.shutdown()
            self.domain_passes.threads = None

    # ---- training -------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        from twinvae.cli.common import make_progress

        cfg = self.config
        history: list[dict[str, Any]] = []
        stopped_early = False
        epoch = self.start_epoch - 1
        try:
            with make_progress(self.progress and self.runtime.is_main) as bar:
                task = bar.add_task(
                    "training", total=(cfg.train.epochs - self.start_epoch) * self.steps_per_epoch
                )
                for epoch in range(self.start_epoch, cfg.train.epochs):
                    bar.update(task, description=f"epoch {epoch + 1}/{cfg.train.epochs}")
                    row = self._train_epoch(epoch, lambda: bar.advance(task))
                    row.update(self._validate(epoch))
                    history.append(row)
                    improved = self._track_best(row)
                    self._save(epoch, row, improved)
                    patience = cfg.train.early_stopping_patience
                    if patience is not None and self.epochs_since_best >= patience:
                        stopped_early = True
                        break
        finally:
            self.stop_domain_threads()
            teardown_runtime(self.runtime)
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
            natural_counts = torch.from_numpy(natural_set.counts[index].astype(np.float32)).to(
                runtime.device
            )
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
            if self.domain_passes is not None:
                loss, terms = self.domain_passes.run(batches, rec_weight, regressor_on)
            else:
                with runtime.autocast():
                    loss, terms = self.step_module(batches, rec_weight, regressor_on)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss.item()} in epoch {epoch + 1}, step {step + 1}; stopped. "
                    f"The last good checkpoint is kept in {self.run_dir / 'last.pt'}. "
                    "Try a lower optim.lr, optim.grad_clip or train.precision=fp32."
                )
            if self.domain_passes is None:
                self.scaler.scale(loss).backward()
            if cfg.optim.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
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
        _append_metrics(self.run_dir / "metrics.csv", row)
        metrics = {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
        checkpoint = Checkpoint(
            config=self.config,
            model_state={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            epoch=epoch,
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            rng_state=_rng_snapshot(),
            metrics=metrics,
            trainer_state={
                "best_mae": self.best_mae,
                "best_epoch": self.best_epoch,
                "epochs_since_best": self.epochs_since_best,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            },
        )
        save_checkpoint(checkpoint, self.run_dir / "last.pt")
        if improved:
            save_checkpoint(checkpoint, self.run_dir / "best.pt")


def _mean_label(data: TrainingData) -> float:
    """Mean count of the labelled natural training images (0 when none is labelled)."""
    train = data.natural_train
    counts = train.counts[train.labelled]
    return float(counts.mean()) if counts.size else 0.0


def _prepare_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"{run_dir}: run folder exists and is not empty; use --resume to continue it "
            "or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=METRIC_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})


def _truncate_metrics(path: Path, last_epoch_index: int) -> None:
    """Drop rows written after the checkpoint a run resumes from (epochs are 1-based in the CSV)."""
    if not path.exists():
        return
    with path.open(newline="", encoding="utf-8") as stream:
        rows = [r for r in csv.DictReader(stream) if int(r["epoch"]) <= last_epoch_index + 1]
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def train(
    config: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    data: TrainingData | None = None,
) -> TrainResult:
    """Train (or resume) a run; writes config.yaml, metrics.csv, last.pt and best.pt."""
    if resume and not (Path(run_dir) / "last.pt").is_file():
        raise CheckpointError(f"{run_dir}: nothing to resume (no last.pt)")
    return Trainer(config, run_dir, resume=resume, progress=progress, data=data).fit()
