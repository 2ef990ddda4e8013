"""Moving a batch to the device: Lightning's three transfer hooks, then the precision plugin's input cast.

The hooks come from the DataModule where it overrides them, else from the module (as in Lightning).
Nothing overridden: the strategy moves the batch (skipped when it already lives on the device).
"""

from __future__ import annotations

from typing import Any

from framework.hooks import overrides
from framework.module_hooks import DataHooks

_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


class BatchTransfer:
    """``transfer(batch, dataloader_idx)``: the batch on the strategy's device in the precision's dtype."""

    def __init__(self, module: Any, datamodule: Any, strategy: Any, precision: Any) -> None:
        self.strategy, self.precision = strategy, precision
        self.hooks = {}
        for name in _HOOKS:
            owner = next((obj for obj in (datamodule, module)
                          if obj is not None and overrides(obj, name, DataHooks)), None)
            if owner is not None:
                self.hooks[name] = getattr(owner, name)
        self.custom = bool(self.hooks)
        self.plain_move = strategy.needs_batch_transfer
        self.cast = precision.converts_input

    def __call__(self, batch: Any, dataloader_idx: int = 0) -> Any:
        if self.custom:
            batch = self._with_hooks(batch, dataloader_idx)
        elif self.plain_move:
            batch = self.strategy.batch_to_device(batch)
        if self.cast:
            batch = self.precision.convert_input(batch)
        return batch

    def _with_hooks(self, batch: Any, dataloader_idx: int) -> Any:
        hooks = self.hooks
        if "on_before_batch_transfer" in hooks:
            batch = hooks["on_before_batch_transfer"](batch, dataloader_idx)
        if "transfer_batch_to_device" in hooks:
            batch = hooks["transfer_batch_to_device"](batch, self.strategy.root_device, dataloader_idx)
        elif self.plain_move:
            batch = self.strategy.batch_to_device(batch)
        if "on_after_batch_transfer" in hooks:
            batch = hooks["on_after_batch_transfer"](batch, dataloader_idx)
        return batch
