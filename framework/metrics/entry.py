"""One logged key's state: its options, its latest step value and its running epoch accumulator.

The accumulator is O(1) in the number of steps: a tensor on the value's device updated in place (the
weighted sum for ``mean``, the sum, the max or the min) plus, for ``mean``, the total weight as a
Python int (batch sizes are host integers, so counting them costs no device work). The epoch value is
computed only when asked for, then cached until the next update. Arithmetic follows Lightning's
(``sum + value * batch_size`` in float32 or wider, divided by the summed batch sizes), with one
difference: the multiply-add is fused (one rounding where Lightning rounds twice), which halves the
tensor operations per call; weighted means can differ from Lightning's in the last bits.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from framework.exceptions import MisconfigurationException

REDUCTIONS: dict[Any, str] = {
    "mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min",
    torch.mean: "mean", torch.sum: "sum", sum: "sum", torch.max: "max", max: "max", torch.min: "min", min: "min",
}
_INITIAL = {"mean": 0.0, "sum": 0.0, "max": float("-inf"), "min": float("inf")}
_SYNC_OP = {"mean": "sum", "sum": "sum", "max": "max", "min": "min"}

Reducer = Callable[[torch.Tensor, str, Any], torch.Tensor]  # (tensor, op, group) -> reduced tensor


def parse_reduce_fx(name: str, reduce_fx: Any) -> str:
    """``reduce_fx`` as one of mean/sum/max/min; Lightning's other reductions are refused the same way."""
    try:
        key = reduce_fx.lower() if isinstance(reduce_fx, str) else reduce_fx
        return REDUCTIONS[key]
    except (KeyError, TypeError):
        raise MisconfigurationException(f"self.log({name!r}, reduce_fx={reduce_fx!r}) is not supported; use 'mean', 'sum', 'max' or "
                         "'min' (or torch.mean/sum/max/min). For another reduction log a torchmetrics.Metric.") from None


def is_metric(value: Any) -> bool:
    """Whether ``value`` is a torchmetrics.Metric, without importing torchmetrics (>1 s) when it is not loaded."""
    tm = sys.modules.get("torchmetrics")
    return tm is not None and isinstance(value, tm.Metric)


class Entry:
    """State of one ``(hook, name, dataloader_idx)`` key for the current stage's epoch."""

    __slots__ = ("fx", "name", "dataloader_idx", "options", "on_step", "on_epoch", "reduce", "logger", "prog_bar",
                 "enable_graph", "sync", "group", "is_tensor", "metric", "step", "acc", "weight", "computed",
                 "has_reset", "reported", "log_name", "step_name", "epoch_name", "metric_attribute")

    def __init__(self, fx: str, name: str, dataloader_idx: int | None, options: tuple, *, on_step: bool,
                 on_epoch: bool, reduce: str, logger: bool, prog_bar: bool, enable_graph: bool, sync: bool,
                 add_dataloader_idx: bool, metric_attribute: str | None, is_tensor: bool) -> None:
        self.fx, self.name, self.dataloader_idx, self.options = fx, name, dataloader_idx, options
        self.on_step, self.on_epoch, self.reduce = on_step, on_epoch, reduce
        self.logger, self.prog_bar, self.enable_graph, self.sync = logger, prog_bar, enable_graph, sync
        self.group: Any = None
        self.is_tensor = is_tensor
        self.metric_attribute = metric_attribute
        self.metric: Any = None  # the torchmetrics.Metric logged under this key
        self.step: torch.Tensor | None = None  # latest step value (on_step)
        self.acc: torch.Tensor | None = None  # running reduction (on_epoch tensors)
        self.weight = 0  # summed batch sizes (mean)
        self.computed: torch.Tensor | None = None  # cached epoch value
        self.has_reset = False
        self.reported = False  # the epoch value went to the loggers (reduce_epoch) since the last update
        base = name + (f"/dataloader_idx_{dataloader_idx}" if add_dataloader_idx and dataloader_idx is not None else "")
        suffix = "/dataloader_idx_" + str(dataloader_idx) if base != name else ""
        self.log_name = base
        forked = on_step and on_epoch
        self.step_name = f"{name}_step{suffix}" if forked else base
        self.epoch_name = f"{name}_epoch{suffix}" if forked else base

    # ---- the hot path ------------------------------------------------------------------------------
    def update(self, value: torch.Tensor, batch_size: int, sync_step: Callable[[torch.Tensor], torch.Tensor] | None
               ) -> None:
        """Record one logged tensor (float32 or float64): the step value and/or the accumulator."""
        if self.on_step:
            self.step = value if sync_step is None else sync_step(value)
        if self.on_epoch:
            acc = self.acc
            if acc is None or value.dtype is not acc.dtype:
                acc = self.acc = self._fresh(value, acc)
            try:
                self._accumulate(acc, value, batch_size)
            except RuntimeError:  # the value moved to another device: follow it
                if value.device == acc.device:
                    raise
                acc = self.acc = self._fresh(value, acc)
                self._accumulate(acc, value, batch_size)
            self.computed = None
            self.reported = False
        self.has_reset = False

    def _accumulate(self, acc: torch.Tensor, value: torch.Tensor, batch_size: int) -> None:
        reduce = self.reduce
        if reduce == "mean":
            acc.add_(value, alpha=batch_size)
            self.weight += batch_size
        elif reduce == "sum":
            acc.add_(value)
        elif reduce == "max":
            torch.maximum(acc, value, out=acc)
        else:
            torch.minimum(acc, value, out=acc)

    def _fresh(self, value: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        """A new accumulator on ``value``'s device and dtype, carrying over what ``old`` held."""
        if old is None:
            return torch.full((), _INITIAL[self.reduce], dtype=value.dtype, device=value.device)
        return old.to(device=value.device, dtype=torch.promote_types(old.dtype, value.dtype))

    def update_metric(self, metric: Any) -> None:
        """Record a logged torchmetrics.Metric: its state stays in the object; the step value is its forward cache."""
        self.metric = metric
        if self.on_step:
            cached = getattr(metric, "_forward_cache", None)
            self.step = cached.detach() if isinstance(cached, torch.Tensor) and not self.enable_graph else cached
        self.computed = None
        self.reported = False
        self.has_reset = False

    # ---- epoch end ---------------------------------------------------------------------------------
    def compute(self, reducer: Reducer | None) -> torch.Tensor | None:
        """The epoch value (cached); ``reducer`` combines ranks when the key was logged with sync_dist."""
        if self.computed is not None:
            return self.computed
        if not self.is_tensor:
            if self.metric is None:
                return None
            value = self.metric.compute()
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"The compute() of the metric logged as {self.name!r} returned "
                                 f"{type(value).__name__}; self.log needs a tensor. Log its items separately.")
        else:
            if self.acc is None:
                return None
            if reducer is not None and not self.sync and not self.options[10]:  # distributed, rank_zero_only off
                _warn_once(f"self.log({self.name!r}, ...) is an epoch value of this rank only; pass "
                           "sync_dist=True to reduce it over every rank (Lightning warns the same).")
            total = self.acc.clone()
            sync = reducer is not None and self.sync
            if sync:
                total = reducer(total, _SYNC_OP[self.reduce], self.group)
            if self.reduce == "mean":
                weight: Any = self.weight
                if sync:
                    weight = reducer(torch.tensor(weight, dtype=torch.int64, device=total.device), "sum", self.group)
                value = total / weight
            else:
                value = total
        self.computed = value if self.enable_graph else value.detach()
        return self.computed

    def reset(self, reset_metric: bool = True) -> None:
        """Start a new epoch: refill the accumulator in place, reset the Metric (Lightning resets both)."""
        if self.acc is not None:
            if self.acc.is_inference() and not torch.is_inference_mode_enabled():
                # made inside an evaluation's inference mode: such a tensor cannot change in place out here
                self.acc = torch.full_like(self.acc, _INITIAL[self.reduce])
            else:
                self.acc.fill_(_INITIAL[self.reduce])
        self.weight = 0
        self.step = self.computed = None
        if self.metric is not None and reset_metric:
            self.metric.reset()
        self.has_reset, self.reported = True, False


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
