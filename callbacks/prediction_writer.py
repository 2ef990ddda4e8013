"""BasePredictionWriter: write predictions as they are made instead of keeping them all in memory.

Subclass it and implement ``write_on_batch_end`` and/or ``write_on_epoch_end``; pair with
``trainer.predict(..., return_predictions=False)`` for outputs larger than memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from framework.hooks import Callback

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

_INTERVALS = ("batch", "epoch", "batch_and_epoch")


class BasePredictionWriter(Callback):
    """``write_interval``: "batch" (each batch's output), "epoch" (all outputs once), or "batch_and_epoch".

    ``batch_indices`` are the dataset indices of the batch's samples when the Trainer tracks them
    (``trainer.predict_loop``), otherwise None.
    """

    def __init__(self, write_interval: str = "batch") -> None:
        if write_interval not in _INTERVALS:
            raise ValueError(f"`write_interval` must be one of {_INTERVALS}, got {write_interval!r}.")
        self.write_interval = write_interval
        self._predictions: list[list[Any]] = []
        self._indices: list[list[Any]] = []

    @property
    def on_batch(self) -> bool:
        return self.write_interval in ("batch", "batch_and_epoch")

    @property
    def on_epoch(self) -> bool:
        return self.write_interval in ("epoch", "batch_and_epoch")

    def write_on_batch_end(self, trainer: Trainer, pl_module: TrainModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        """Write one batch's ``prediction`` (override for write_interval "batch"/"batch_and_epoch")."""
        raise NotImplementedError(f"{type(self).__name__}(write_interval={self.write_interval!r}) must implement "
                                  "write_on_batch_end(trainer, pl_module, prediction, batch_indices, batch, "
                                  "batch_idx, dataloader_idx).")

    def write_on_epoch_end(self, trainer: Trainer, pl_module: TrainModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        """Write every prediction of the epoch (override for write_interval "epoch"/"batch_and_epoch").

        ``predictions`` is the list of batch outputs (a list per dataloader when there are several);
        ``batch_indices`` a list per dataloader of each batch's sample indices (None where unknown).
        """
        raise NotImplementedError(f"{type(self).__name__}(write_interval={self.write_interval!r}) must implement "
                                  "write_on_epoch_end(trainer, pl_module, predictions, batch_indices).")

    def on_predict_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._predictions, self._indices = [], []

    def on_predict_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        indices = _current_batch_indices(trainer)
        if self.on_batch:
            self.write_on_batch_end(trainer, module, outputs, indices, batch, batch_idx, dataloader_idx)
        if self.on_epoch:
            while len(self._predictions) <= dataloader_idx:
                self._predictions.append([])
                self._indices.append([])
            self._predictions[dataloader_idx].append(outputs)
            self._indices[dataloader_idx].append(indices)

    def on_predict_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if not self.on_epoch:
            return
        predictions = self._predictions[0] if len(self._predictions) == 1 else self._predictions
        self.write_on_epoch_end(trainer, module, predictions, self._indices)
        self._predictions, self._indices = [], []


def _current_batch_indices(trainer: Any) -> list[int] | None:
    loop = getattr(trainer, "predict_loop", None)
    indices = getattr(loop, "current_batch_indices", None)
    return list(indices) if indices else None
