"""What a training run reports as it goes: callbacks, and the progress bar as one of them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from typing import Any, Protocol

from twinvae.progress import Task, bar


class TrainingCallback(Protocol):
    """Hooks the trainer calls; each may do nothing. Epochs are 0-based here."""

    def on_fit_start(self, first_epoch: int, epochs: int, steps_per_epoch: int) -> None: ...

    def on_epoch_start(self, epoch: int, epochs: int) -> None: ...

    def on_step(self) -> None: ...

    def on_epoch_end(self, row: Mapping[str, Any]) -> None: ...

    def on_fit_end(self) -> None:
        """Called after the last epoch, also when training stopped with an error."""


class ProgressBar:
    """A `twinvae.progress` bar over the steps of the run, labelled with the epoch; shown by
    the display a front end installed (the CLI's rich bars), silent otherwise."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._task: Task | None = None

    def on_fit_start(self, first_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        total = (epochs - first_epoch) * steps_per_epoch
        self._task = self._stack.enter_context(bar("training", total))

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if self._task is not None:
            self._task.describe(f"epoch {epoch + 1}/{epochs}")

    def on_step(self) -> None:
        if self._task is not None:
            self._task.advance()

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        pass

    def on_fit_end(self) -> None:
        self._task = None
        self._stack.close()


class Callbacks:
    """Several callbacks called as one, in order."""

    def __init__(self, callbacks: Iterable[TrainingCallback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_fit_start(self, first_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        for callback in self.callbacks:
            callback.on_fit_start(first_epoch, epochs, steps_per_epoch)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        for callback in self.callbacks:
            callback.on_epoch_start(epoch, epochs)

    def on_step(self) -> None:
        for callback in self.callbacks:
            callback.on_step()

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(row)

    def on_fit_end(self) -> None:
        for callback in self.callbacks:
            callback.on_fit_end()
