"""Step strategies: one training step's forward and backward passes over both domains.

The trainer draws the batches, zeroes the gradients and steps the optimiser; a strategy turns
the batches into a loss and gradients:

- `AutocastStep`: both domains in one `TwinStep` module under the run's autocast, backward
  through the gradient scaler (fp16 on CUDA); wrapped in DistributedDataParallel under DDP,
  which needs one forward per backward.
- `DomainPasses`: a one-process CPU run; each domain's forward and backward pass on its own
  thread, side by side (see the class).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from twinvae.accel import (
    RunningUpdate,
    apply_running_updates,
    independent_pass,
    require_independent_passes,
)
from twinvae.config import ExperimentConfig, LossConfig
from twinvae.models.twin_vae import DomainName, TwinVAE
from twinvae.training.device import Runtime
from twinvae.training.losses import DomainLoss, twin_domain_loss

# domain, images, counts: (N,), or (N, 2) counts and loss weights (pseudo-labels, `losses`)
DomainBatch = tuple[DomainName, torch.Tensor, torch.Tensor]
StepLoss = tuple[torch.Tensor, dict[str, torch.Tensor]]  # total (detached), terms by name


class StepStrategy(Protocol):
    """Forward and backward of one step; gradients end up in the parameters' ``.grad``."""

    @property
    def description(self) -> str:
        """What kind of step this is, recorded with the run's runtime (`runtime_record`)."""

    def trainable_changed(self) -> None:
        """The set of trainable parameters changed (a transfer stage began)."""

    def forward_backward(
        self, batches: list[DomainBatch], rec_weight: float, regressor_on: bool
    ) -> StepLoss:
        """The step's total loss (detached) and its unweighted terms, after backward."""

    def close(self) -> None:
        """Release threads or other resources; later steps may still run (more slowly)."""


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


class AutocastStep:
    """`TwinStep` under the run's autocast, backward through the gradient scaler; under DDP
    the module is wrapped anew whenever the trainable parameters change (DDP fixes them at
    wrap time)."""

    def __init__(
        self,
        model: TwinVAE,
        config: ExperimentConfig,
        runtime: Runtime,
        scaler: torch.amp.GradScaler,
    ) -> None:
        self.model, self.config, self.runtime, self.scaler = model, config, runtime, scaler
        self.module: nn.Module = TwinStep(model, config)
        self.description = "ddp" if runtime.distributed else "one module"

    def trainable_changed(self) -> None:
        base = TwinStep(self.model, self.config)
        if self.runtime.distributed:
            device = self.runtime.device
            device_ids = [device.index] if device.type == "cuda" else None
            self.module = DistributedDataParallel(
                base, device_ids=device_ids, find_unused_parameters=True
            )
        else:
            self.module = base

    def forward_backward(
        self, batches: list[DomainBatch], rec_weight: float, regressor_on: bool
    ) -> StepLoss:
        with self.runtime.autocast():
            loss, terms = self.module(batches, rec_weight, regressor_on)
        self.scaler.scale(loss).backward()
        return loss.detach(), terms

    def close(self) -> None:
        pass


class DomainPasses:
    """The training step of a one-process CPU run: each domain's forward and backward pass as
    an `independent_pass`, on two threads side by side when ``threads`` is given, else one
    after the other. Either way the passes draw from their own generators, seeded in order from
    torch's global one, and their batch-norm statistics are applied in domain order, so the
    numbers do not depend on the threads' timing (without threads they are the same up to the
    rounding of oneDNN, which depends on its thread count).

    Side by side is faster on the CPU: oneDNN's kernels gain little from a second thread, so
    two passes at half the threads each keep the cores busier (benchmarks/README.md). The
    domains share parameters only as leaves, whose gradients autograd adds under a lock
    (a + b, the same in either order).
    """

    def __init__(
        self,
        model: TwinVAE,
        config: ExperimentConfig,
        runtime: Runtime,
        threads: ThreadPoolExecutor | None,
    ) -> None:
        if threads is not None:  # side by side, plain dropout and batch norms would race
            require_independent_passes(model)
        self.model = model
        self.loss_config = config.loss
        self.runtime = runtime
        self.threads = threads

    @property
    def description(self) -> str:
        return "domain passes side by side" if self.threads is not None else "domain passes"

    def trainable_changed(self) -> None:
        pass  # the passes run the model itself: frozen parameters simply get no gradient

    def forward_backward(
        self, batches: list[DomainBatch], rec_weight: float, regressor_on: bool
    ) -> StepLoss:
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

    def close(self) -> None:
        """End the domain threads; later steps run the passes in turn (the same numbers up to
        oneDNN's rounding, which depends on its thread count)."""
        if self.threads is not None:
            self.threads.shutdown()
            self.threads = None


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


def make_step(
    model: TwinVAE,
    config: ExperimentConfig,
    runtime: Runtime,
    scaler: torch.amp.GradScaler,
    two_domains: bool,
) -> StepStrategy:
    """The step strategy this run's runtime calls for."""
    if uses_domain_passes(runtime):
        threads = domain_threads(runtime, config, two_domains)
        return DomainPasses(model, config, runtime, threads)
    return AutocastStep(model, config, runtime, scaler)
