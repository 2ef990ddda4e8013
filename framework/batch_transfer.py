"""The batch-transfer hooks: ``on_before_batch_transfer`` -> ``transfer_batch_to_device`` ->
``on_after_batch_transfer``, taken from the module or the datamodule by Lightning's rule.

Rule (Lightning's ``_DataHookSelector``): without a datamodule, the module's hook; with one, the
datamodule's when it overrides the hook (a warning if the module overrides it too), else the module's
(a warning if the module overrides it, since a datamodule was given). ``BatchTransfer.active`` is
False when neither overrides any of the three, so the loop keeps its own hook-free path.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["move_data_to_device", "BatchTransfer", "BATCH_HOOKS"]

BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def move_data_to_device(batch: Any, device: torch.device | str | int) -> Any:
    """Tensors inside ``batch`` (dicts, lists, tuples, namedtuples, dataclasses, objects with ``.to``)
    moved to ``device``; everything else as it is."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return type(batch)((k, move_data_to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_data_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_data_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: move_data_to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    to = getattr(batch, "to", None)
    return to(device) if callable(to) else batch


def _overridden(obj: Any, name: str) -> bool:
    """True when ``obj`` defines ``name`` itself (class or instance), not Kiln's default."""
    if name in getattr(obj, "__dict__", {}):
        return True
    impl = getattr(type(obj), name, None)
    if impl is None:
        return False
    from framework.datamodule import DataModule
    from framework.module import TrainModule

    return impl is not getattr(TrainModule, name, None) and impl is not getattr(DataModule, name, None)


def _owner(module: Any, datamodule: Any, name: str) -> Any | None:
    """Whose ``name`` hook runs (None: nobody overrides it, the default applies)."""
    in_module = _overridden(module, name)
    if datamodule is None:
        return module if in_module else None
    if _overridden(datamodule, name):
        if in_module:
            warnings.warn(f"{name} is overridden in both {type(module).__name__} and {type(datamodule).__name__}; "
                          "the datamodule's runs.", UserWarning, stacklevel=4)
        return datamodule
    if in_module:
        warnings.warn(f"{name} is overridden in {type(module).__name__} and a datamodule was passed that does not "
                      "override it; the module's runs.", UserWarning, stacklevel=4)
        return module
    return None


class BatchTransfer:
    """The three hooks bound once per run; call it as ``transfer(batch, dataloader_idx)``.

    ``default_move`` moves a batch when nobody overrides ``transfer_batch_to_device`` (the strategy's
    move, or None where batches already live on the device).
    """

    def __init__(self, module: Any, datamodule: Any, device: torch.device,
                 default_move: Callable[[Any], Any] | None = None) -> None:
        owners = {name: _owner(module, datamodule, name) for name in BATCH_HOOKS}
        self.device = device
        self.active = any(owner is not None for owner in owners.values())
        self._before = _bound(owners["on_before_batch_transfer"], "on_before_batch_transfer")
        self._transfer = _bound(owners["transfer_batch_to_device"], "transfer_batch_to_device")
        self._after = _bound(owners["on_after_batch_transfer"], "on_after_batch_transfer")
        self._default_move = default_move

    def __call__(self, batch: Any, dataloader_idx: int = 0) -> Any:
        if self._before is not None:
            batch = self._before(batch, dataloader_idx)
        if self._transfer is not None:
            batch = self._transfer(batch, self.device, dataloader_idx)
        elif self._default_move is not None:
            batch = self._default_move(batch)
        if self._after is not None:
            batch = self._after(batch, dataloader_idx)
        return batch


def _bound(owner: Any, name: str) -> Callable[..., Any] | None:
    return getattr(owner, name) if owner is not None else None
