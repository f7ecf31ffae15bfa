"""Transfer runs, including the double transfer (A -> B -> A) as one config."""

from __future__ import annotations

from pathlib import Path

from twinvae.config import ExperimentConfig, TransferConfig
from twinvae.training.checkpoint import load_checkpoint
from twinvae.training.run_dir import RunDirectory, is_writer_process
from twinvae.training.trainer import TrainResult, train


def transfer_config(
    config: ExperimentConfig, source: str | Path, strategy: str | None = None
) -> ExperimentConfig:
    """This run's config with the source checkpoint's model sizes and the chosen strategy."""
    source_config = load_checkpoint(source).config
    transfer = config.transfer or TransferConfig()
    updates: dict[str, object] = {"from_checkpoint": str(source)}
    if strategy is not None:
        updates["strategy"] = strategy
    return config.model_copy(
        update={
            "model": source_config.model,
            "transfer": TransferConfig.model_validate({**transfer.model_dump(), **updates}),
        }
    )


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
