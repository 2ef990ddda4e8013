"""Collecting what ``self.log`` receives and turning it into step and epoch metrics.

The hot path (``log`` during training) only stores a detached tensor reference: no ``.item()``, no
arithmetic. Host transfers happen in ``materialize``, which the Trainer calls only on steps where a logger
writes, and at epoch ends. Defaults follow Lightning: in training a value is a step metric; in
validation/test it is averaged over the epoch (weighted by ``batch_size`` when given).
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_TRAIN = "train"
_REDUCERS = ("mean", "sum", "max", "min")


def _is_torchmetric(value: Any) -> bool:
    tm = sys.modules.get("torchmetrics")  # torchmetrics costs >1 s to import: never import it here
    return tm is not None and isinstance(value, tm.Metric)


class MetricCollector:
    """Stores logged values for the current stage and reduces them at epoch end."""

    def __init__(self) -> None:
        self.stage = _TRAIN
        self.dataloader_suffix = ""
        self.step_values: dict[str, torch.Tensor] = {}  # latest step-level values (train)
        self.epoch_values: dict[str, torch.Tensor] = {}  # finished epoch-level values
        # What callbacks see: the latest value under every name, kept across stages (Lightning's model), so a
        # training value stays visible during validation and a bare name follows its newest step/epoch value.
        self._callback: dict[str, torch.Tensor] = {}
        self.prog_bar_keys: set[str] = set()
        self.epoch_hook = False  # inside on_train_epoch_start/end: self.log defaults to an epoch value
        self._epoch_items: dict[str, tuple[list, list, str, bool]] = {}  # name -> (values, weights, fx, sync)
        self._metrics: dict[str, tuple[Any, bool]] = {}  # name -> (torchmetrics.Metric, on_epoch)
        self._sync_step: set[str] = set()
        self.reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None  # strategy all_reduce

    # ---- called from TrainModule.log ---------------------------------------------------------
    def log(self, name: str, value: Any, on_step: bool | None, on_epoch: bool | None, prog_bar: bool,
            sync_dist: bool, reduce_fx: str, batch_size: int | None) -> None:
        training = self.stage == _TRAIN
        if on_step is None:
            on_step = training and not self.epoch_hook
        if on_epoch is None:
            on_epoch = not training or self.epoch_hook
        if not (on_step or on_epoch):
            raise ValueError(f"self.log({name!r}, on_step=False, on_epoch=False) would log nothing; set one to True.")
        if reduce_fx not in _REDUCERS:
            raise ValueError(f"self.log({name!r}, reduce_fx={reduce_fx!r}) is not supported; use one of {_REDUCERS}.")
        name = name + self.dataloader_suffix
        if prog_bar:
            self.prog_bar_keys.add(name)
        if _is_torchmetric(value):
            if on_step:
                cached = getattr(value, "_forward_cache", None)
                if isinstance(cached, torch.Tensor):
                    self._store_step(name, cached.detach(), on_epoch, sync_dist)
            # Step-only metrics are registered too: every logged Metric is reset at epoch end, as in Lightning.
            if on_epoch or name not in self._metrics:
                self._metrics[name] = (value, on_epoch)
            return
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"self.log({name!r}, ...) got a tensor of shape {tuple(value.shape)}; "
                                 "log a scalar (e.g. value.mean()) or use log_dict for several values.")
            value = value.detach()
        elif isinstance(value, numbers.Number) and not isinstance(value, bool):
            value = torch.tensor(float(value))
        else:
            raise TypeError(f"self.log({name!r}, value={value!r}): value must be a number, a scalar tensor or a "
                            "torchmetrics.Metric.")
        if on_step:
            self._store_step(name, value, on_epoch, sync_dist)
        if on_epoch:
            items = self._epoch_items.get(name)
            if items is None:
                items = self._epoch_items[name] = ([], [], reduce_fx, sync_dist)
            items[0].append(value)
            items[1].append(1 if batch_size is None else batch_size)

    def _store_step(self, name: str, value: torch.Tensor, also_epoch: bool, sync_dist: bool) -> None:
        key = name + "_step" if also_epoch else name
        if sync_dist and self.reduce is not None:
            value = self.reduce(value.float(), "mean")
        self.step_values[key] = value
        self._callback[key] = value
        if also_epoch:
            self._callback[name] = value

    # ---- called by the loops ---------------------------------------------------------------------
    @contextmanager
    def epoch_level(self) -> Iterator[None]:
        """Run epoch hooks in here: what they log is an epoch value by default (Lightning's defaults)."""
        self.epoch_hook = True
        try:
            yield
        finally:
            self.epoch_hook = False

    def start_stage(self, stage: str) -> None:
        """Begin a stage's epoch. An evaluation inside a training epoch sets the training values aside."""
        if stage == _TRAIN:
            self.stage = stage
            self._epoch_items.clear()
            self._metrics.clear()
            return
        self._saved = (self.stage, self.step_values, self._epoch_items, self._metrics)
        self.stage, self.step_values, self._epoch_items, self._metrics = stage, {}, {}, {}

    def end_stage(self) -> None:
        if self.stage != _TRAIN and getattr(self, "_saved", None) is not None:
            self.stage, self.step_values, self._epoch_items, self._metrics = self._saved
            self._saved = None

    def has_pending(self) -> bool:
        """Whether anything logged at epoch level awaits ``reduce_epoch``."""
        return bool(self._epoch_items or self._metrics)

    def reduce_epoch(self) -> dict[str, torch.Tensor]:
        """Reduce everything logged with on_epoch=True in the current stage and store it in epoch_values."""
        out: dict[str, torch.Tensor] = {}
        for name, (values, weights, fx, sync) in self._epoch_items.items():
            stacked = torch.stack([v.float().reshape(()) for v in values])
            if fx == "mean":
                w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
                total, count = (stacked * w).sum(), w.sum()
                if sync and self.reduce is not None:
                    total, count = self.reduce(total, "sum"), self.reduce(count, "sum")
                value = total / count
            else:
                value = getattr(stacked, fx)()
                if sync and self.reduce is not None:
                    value = self.reduce(value, fx)
            out[self._epoch_key(name)] = value
            self._callback[name] = value
        for name, (metric, on_epoch) in self._metrics.items():
            # torchmetrics synchronises across ranks inside compute() when a process group exists.
            if on_epoch:
                out[self._epoch_key(name)] = self._callback[name] = metric.compute().detach()
        for metric in {id(m): m for m, _ in self._metrics.values()}.values():  # after every compute
            metric.reset()
        self._epoch_items.clear()
        self._metrics.clear()
        self.epoch_values.update(out)
        self._callback.update(out)
        return out

    def _epoch_key(self, name: str) -> str:
        return name + "_epoch" if (name + "_step") in self.step_values and self.stage == _TRAIN else name

    def callback_metrics(self) -> dict[str, torch.Tensor]:
        return dict(self._callback)

    def progress_bar_metrics(self) -> dict[str, torch.Tensor]:
        metrics = self.callback_metrics()
        return {k: v for k, v in metrics.items() if k in self.prog_bar_keys or _base_key(k) in self.prog_bar_keys}


def _base_key(key: str) -> str:
    for suffix in ("_step", "_epoch"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """One host transfer for a whole dict of scalar tensors."""
    if not metrics:
        return {}
    keys = list(metrics)
    values = torch.stack([metrics[k].detach().float().reshape(()).cpu() for k in keys]).tolist()
    return dict(zip(keys, values))
