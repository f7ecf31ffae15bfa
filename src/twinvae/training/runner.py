"""Transfer runs, including the double transfer (A -> B -> A) as one config."""

from __future__ import annotations

from pathlib import Path

from twinvae.config import ExperimentConfig, TransferConfig
from twinvae.training.run_dir import RunDirectory, is_writer_process
from twinvae.training.sources import check_transfer_plan, resolve_transfer_source
from twinvae.training.trainer import TrainResult, train


def transfer_config(
    config: ExperimentConfig, source: str | Path, strategy: str | None = None
) -> ExperimentConfig:
    """This run's config with the source's model sizes and the chosen strategy.

    ``source``: a checkpoint or run folder, a bundle, or a zoo model (`resolve_transfer_source`).
    A source with only the counting path allows only natural-only runs (ConfigError otherwise,
    before any run folder exists; `check_transfer_plan`).
    """
    resolved = resolve_transfer_source(source)
    transfer = config.transfer or TransferConfig()
    updates: dict[str, object] = {"from_checkpoint": resolved.spec}
    if strategy is not None:
        updates["strategy"] = strategy
    planned = config.model_copy(
        update={
            "model": resolved.model,
            "transfer": TransferConfig.model_validate({**transfer.model_dump(), **updates}),
        }
    )
    check_transfer_plan(resolved, planned)
    return planned


def run_transfer(
    config: ExperimentConfig, source: str | Path, run_dir: Path, *, progress: bool = True
) -> list[TrainResult]:
    """One transfer; with ``transfer.second_stage`` a second one from the first one's best,
    in ``run_dir``/leg1 and leg2 (``run_dir`` stays locked for both)."""
    first = transfer_config(config, source)
    assert first.transfer is not None
    second = first.transfer.second_stage
    if second is None:
        return [train(first, run_dir, progress=progress)]
    with RunDirectory.new(Path(run_dir), writer=is_writer_process()) as folder:
        first_dir, second_dir = folder.path / "leg1", folder.path / "leg2"
        results = [train(first, first_dir, progress=progress)]
        second_config = first.model_copy(
            update={
                "data": second.data,
                "train": first.train.model_copy(update={"epochs": second.epochs}),
                "transfer": TransferConfig(strategy=second.strategy),
            }
        )
        second_config = transfer_config(second_config, first_dir / "best.pt")
        results.append(train(second_config, second_dir, progress=progress))
    return results
