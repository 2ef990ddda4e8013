"""Keeping ranks with different numbers of batches in lockstep, without counting any sample twice.

Every collective (DDP's gradient all-reduce, FSDP's all-gathers, ``sync_dist`` logging, ``num_items``)
must run the same number of times on every rank. When the data gives ranks different numbers of
batches, the shorter ranks run *ghost steps*: the user's step on their last real batch again, with

- the loss multiplied by zero (training), so the ghost adds nothing to the gradients, and the real
  ranks' averaged gradients rescaled by ``world_size / active_ranks`` — the mean over real batches;
- ``self.log`` values weighted zero (``batch_size=0`` for means, ``0 *`` value for sums; max/min are
  unchanged by a repeat) and torchmetrics states restored afterwards;
- ``num_items`` reporting 0 items, so the exact global item count stays exact;
- outputs dropped (evaluation and prediction), so predictions hold every sample exactly once.

Training ghosts are real loop iterations (the loader reports the longest rank's length, so
``global_step``, schedulers and checkpoints stay identical across ranks); evaluation ghosts run inside
the rank's last real step, invisible to the loop and its callbacks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class GhostFlag:
    """Whether the step running now is a ghost step (exposed as ``strategy.in_ghost_step``)."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False


# ---- evaluation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalPlan:
    """This rank's ghost steps for one evaluation loader: ``extra`` steps after batch ``last``."""

    last: int
    extra: int

    @staticmethod
    def create(lengths: list[int], rank: int, limit: int | float | None) -> EvalPlan | None:
        """The plan for ``rank``; None when some rank would run no batch at all (pad instead)."""
        from framework.data import resolve_limit  # the loop's own limit rule, so the counts agree

        stops = [resolve_limit(n, limit)[1] for n in lengths]
        if min(stops) == 0 and max(stops) > 0:
            return None
        return EvalPlan(last=stops[rank] - 1, extra=max(stops) - stops[rank])


def wrap_eval_step(step: Callable[..., Any], plans: list[EvalPlan | None], module: nn.Module,
                   flag: GhostFlag) -> Callable[..., Any]:
    """``step`` followed, after this rank's last real batch, by its ghost steps (outputs dropped)."""

    def eval_step(batch: Any, batch_idx: int, *dataloader_idx: int) -> Any:
        output = step(batch, batch_idx, *dataloader_idx)
        plan = plans[dataloader_idx[0] if dataloader_idx else 0]
        if plan is not None and batch_idx == plan.last:
            with ghost_step(module, flag):
                for k in range(1, plan.extra + 1):
                    step(batch, batch_idx + k, *dataloader_idx)
        return output

    return eval_step


# ---- training --------------------------------------------------------------------------------------
class UnevenTraining:
    """Lockstep for a training loader whose ranks have ``lengths`` batches (``even_batches=False``)."""

    def __init__(self, lengths: list[int], rank: int, module: nn.Module, flag: GhostFlag) -> None:
        self.lengths = lengths
        self.rank = rank
        self.world_size = len(lengths)
        self.module = module
        self.flag = flag
        self.next_is_ghost = False  # set by the loader when it yields a ghost batch
        self.step_is_ghost = False  # the step running now (and its backward) is a ghost
        self.window_start: int | None = None
        self.counts_items = getattr(type(module), "num_items", None) is not None

    def wrap_loader(self, loader: Any) -> Any:
        """The same loader, reporting the longest rank's length and repeating its last batch as ghosts."""
        loader.__class__ = _lockstep_class(type(loader))
        loader._kiln_uneven = self
        return loader

    def iterate(self, batches: Iterator[Any], fallback: Callable[[], Any]) -> Iterator[Any]:
        self.window_start = None
        self.restore_module()
        last = _NOTHING = object()
        for batch in batches:
            last = batch
            yield batch
        if last is _NOTHING:
            last = fallback()
        self.next_is_ghost = True
        if self.counts_items:
            self.module.num_items = _no_items  # instance attribute: shadows the method for ghost batches
        while True:  # the loop stops at len(loader), the longest rank's length
            yield last

    def wrap_step(self, step: Callable[..., Any], module: nn.Module) -> Callable[..., Any]:
        def training_step(batch: Any, batch_idx: int) -> Any:
            if self.window_start is None:
                self.window_start = batch_idx
            self.step_is_ghost = self.next_is_ghost
            if not self.step_is_ghost:
                return step(batch, batch_idx)
            with ghost_step(module, self.flag):
                return _zero_loss(step(batch, batch_idx))

        return training_step

    def gradient_factor(self) -> float:
        """At a synchronising backward: ``world / ranks with real data in this window`` (1 with num_items)."""
        start, self.window_start = self.window_start or 0, None
        if self.counts_items:
            return 1.0
        active = sum(1 for n in self.lengths if n > start)
        return self.world_size / active if active else 1.0

    def restore_module(self) -> None:
        """Remove the ghost ``num_items`` (at each epoch start and at teardown)."""
        self.next_is_ghost = self.step_is_ghost = False
        if self.module.__dict__.get("num_items") is _no_items:
            del self.module.__dict__["num_items"]


def _lockstep_class(cls: type) -> type:
    """A subclass of the loader's class reporting the longest rank's length and appending ghost batches."""

    def __len__(self: Any) -> int:
        return max(self._kiln_uneven.lengths)

    def __iter__(self: Any) -> Iterator[Any]:
        return self._kiln_uneven.iterate(cls.__iter__(self), lambda: self.collate_fn([self.dataset[0]]))

    return type(f"Lockstep{cls.__name__}", (cls,), {"__len__": __len__, "__iter__": __iter__})


def _no_items(batch: Any) -> int:
    return 0


def _zero_loss(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output * 0
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return {**output, "loss": output["loss"] * 0}
    return output


# ---- neutral logging -------------------------------------------------------------------------------
@contextmanager
def ghost_step(module: nn.Module, flag: GhostFlag) -> Iterator[None]:
    """Run a step whose logged values carry no weight and whose torchmetrics updates are undone."""
    real_log = module.log

    def log(name: str, value: Any, *, reduce_fx: str = "mean", batch_size: int | None = None, **kwargs: Any) -> None:
        if reduce_fx == "mean":
            batch_size = 0
        elif reduce_fx == "sum" and isinstance(value, (torch.Tensor, int, float)):
            value = value * 0
        real_log(name, value, reduce_fx=reduce_fx, batch_size=batch_size, **kwargs)

    module.__dict__["log"] = log
    saved = _metric_states(module)
    was_active, flag.active = flag.active, True
    try:
        yield
    finally:
        flag.active = was_active
        module.__dict__.pop("log", None)
        _restore_metric_states(saved)


def _metric_states(module: nn.Module) -> list[tuple[Any, dict[str, Any]]]:
    torchmetrics = sys.modules.get("torchmetrics")
    if torchmetrics is None:
        return []
    saved = []
    for metric in module.modules():
        if isinstance(metric, torchmetrics.Metric):
            state = {name: _copy(getattr(metric, name)) for name in metric._defaults}
            state["_update_count"] = metric._update_count
            state["_computed"] = metric._computed
            saved.append((metric, state))
    return saved


def _restore_metric_states(saved: list[tuple[Any, dict[str, Any]]]) -> None:
    for metric, state in saved:
        for name, value in state.items():
            setattr(metric, name, value)


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return list(value)
    return value
