"""A batch on its way into a step: Lightning's transfer hooks (``framework.batch_transfer`` picks whose),
then the precision plugin's input cast.

Nothing overridden: the strategy moves the batch itself, and not at all when it already lives on the
device (CPU training); with nothing to do the loop does not call it at all (``needed``).
"""

from __future__ import annotations

from typing import Any

from framework.batch_transfer import BatchTransfer


class LoopTransfer:
    """``transfer(batch, dataloader_idx)``: the batch on the strategy's device in the precision's dtype."""

    def __init__(self, module: Any, datamodule: Any, strategy: Any, precision: Any) -> None:
        self.strategy, self.precision = strategy, precision
        self.plain_move = strategy.needs_batch_transfer
        self.hooks = BatchTransfer(module, datamodule, strategy.root_device,
                                   strategy.batch_to_device if self.plain_move else None)
        self.custom = self.hooks.active
        self.cast = precision.converts_input
        self.needed = self.custom or self.plain_move or self.cast  # False: batches go in as they come

    def __call__(self, batch: Any, dataloader_idx: int = 0) -> Any:
        if self.custom:
            batch = self.hooks(batch, dataloader_idx)
        elif self.plain_move:
            batch = self.strategy.batch_to_device(batch)
        if self.cast:
            batch = self.precision.convert_input(batch)
        return batch
