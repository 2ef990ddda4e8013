"""Parsing ``configure_optimizers`` and stepping LR schedulers.

Every contract form of ``configure_optimizers`` is normalised to ``(optimizers, scheduler_configs)``.
Scheduler stepping lives here so the loop only says *when* (a step boundary or an epoch end) and this
module decides *which* schedulers advance: a step-interval scheduler never advances on a step the fp16
scaler skipped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from framework.exceptions import MisconfigurationException

_FIX = (
    "configure_optimizers() must return an optimizer, a list of optimizers, a tuple (optimizers, schedulers), "
    'or a dict {"optimizer": opt, "lr_scheduler": scheduler | {"scheduler": s, "interval": "step"|"epoch"}}'
)


class SchedulerAPIError(MisconfigurationException, TypeError):
    """A scheduler the Trainer must step but cannot: a TypeError, and Lightning's MisconfigurationException."""


@dataclass
class LRSchedulerConfig:
    """One LR scheduler and when to step it (mirrors Lightning's scheduler dict)."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    name: str | None = None
    monitor: str | None = None
    strict: bool = True
    optimizer_index: int = 0

    @property
    def needs_metric(self) -> bool:
        return isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def parse_optimizers(result: Any, *, automatic: bool = True, custom_step: bool = False
                     ) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    """Normalise what ``configure_optimizers`` returned; raise a TypeError/ValueError naming the problem.

    ``automatic``: automatic optimization (the Trainer steps schedulers, so they must follow torch's API unless
    ``custom_step`` — the module overrides ``lr_scheduler_step``); under manual optimization the user steps them.
    """
    optimizers, configs = _parse(result)
    if automatic:
        for optimizer in optimizers:
            if isinstance(optimizer, torch.optim.LBFGS):
                raise MisconfigurationException(
                    "torch.optim.LBFGS evaluates its closure several times per step, but Kiln's automatic "
                    "optimization runs training_step once per batch (Lightning re-runs it). Use manual "
                    "optimization: set self.automatic_optimization = False and call "
                    "self.optimizers().step(closure=...) with a closure that does forward and manual_backward.")
    for config in configs:
        _check_scheduler(config, automatic, custom_step)
    return optimizers, configs


def _parse(result: Any) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    if result is None:
        raise TypeError(f"configure_optimizers() returned None. {_FIX}.")
    if isinstance(result, torch.optim.Optimizer):
        return [result], []
    if isinstance(result, dict):
        return _parse_dicts([result])
    if isinstance(result, (list, tuple)):
        items = list(result)
        if not items:
            raise ValueError(f"configure_optimizers() returned an empty {type(result).__name__}. {_FIX}.")
        if all(isinstance(o, torch.optim.Optimizer) for o in items):
            return items, []
        if all(isinstance(o, dict) for o in items):
            return _parse_dicts(items)
        if len(items) == 2 and isinstance(items[0], (list, tuple)):
            optimizers = list(items[0])
            schedulers = items[1] if isinstance(items[1], (list, tuple)) else [items[1]]
            _check_optimizers(optimizers)
            configs = [_scheduler_config(s, optimizers) for s in schedulers]
            return optimizers, configs
    raise TypeError(f"configure_optimizers() returned {_describe(result)}. {_FIX}.")


def _parse_dicts(dicts: list[dict]) -> tuple[list[torch.optim.Optimizer], list[LRSchedulerConfig]]:
    optimizers: list[torch.optim.Optimizer] = []
    configs: list[LRSchedulerConfig] = []
    for entry in dicts:
        unknown = set(entry) - {"optimizer", "lr_scheduler", "monitor"}
        if "optimizer" not in entry or unknown:
            raise ValueError(
                f"configure_optimizers() returned a dict with keys {sorted(entry)}; "
                f'it needs "optimizer" and may have "lr_scheduler" and "monitor". {_FIX}.'
            )
        optimizers.append(entry["optimizer"])
        _check_optimizers(optimizers)
        if entry.get("lr_scheduler") is not None:
            configs.append(_scheduler_config(entry["lr_scheduler"], optimizers, entry.get("monitor")))
    return optimizers, configs


def _scheduler_config(spec: Any, optimizers: list[torch.optim.Optimizer],
                      monitor: str | None = None) -> LRSchedulerConfig:
    """``monitor`` is the outer dict's ``"monitor"``, used when the scheduler spec names none."""
    if isinstance(spec, LRSchedulerConfig):
        config = spec
    elif isinstance(spec, dict):
        if "scheduler" not in spec:
            raise ValueError(f'An lr_scheduler dict needs a "scheduler" key; got keys {sorted(spec)}.')
        unknown = set(spec) - {"scheduler", "interval", "frequency", "name", "monitor", "strict"}
        if unknown:
            raise ValueError(f"Unknown lr_scheduler keys {sorted(unknown)}; allowed: scheduler, interval, "
                             "frequency, name, monitor, strict.")
        config = LRSchedulerConfig(**spec)
    else:
        config = LRSchedulerConfig(scheduler=spec)
    if config.interval not in ("step", "epoch"):
        raise ValueError(f'lr_scheduler interval={config.interval!r} is invalid; use "step" or "epoch".')
    if not isinstance(config.frequency, int) or config.frequency < 1:
        raise ValueError(f"lr_scheduler frequency={config.frequency!r} is invalid; use an int >= 1.")
    scheduler = config.scheduler
    if not (callable(getattr(scheduler, "state_dict", None)) and callable(getattr(scheduler, "load_state_dict", None))):
        raise TypeError(f"{_describe(scheduler)} is not an LR scheduler: it needs state_dict() and "
                        "load_state_dict() (checkpoints save and restore it).")
    optimizer = getattr(scheduler, "optimizer", None)
    if optimizer is not None:
        matches = [i for i, o in enumerate(optimizers) if o is optimizer]
        if not matches:
            raise ValueError("An LR scheduler was built on an optimizer that configure_optimizers() did not return; "
                             "create the scheduler from one of the returned optimizers.")
        config.optimizer_index = matches[0]
    config.monitor = config.monitor or monitor
    return config


def _check_scheduler(config: LRSchedulerConfig, automatic: bool, custom_step: bool) -> None:
    """Lightning's rules: what the Trainer steps must be steppable; manual optimization ignores step settings."""
    scheduler = config.scheduler
    if not automatic:
        if config.monitor is not None:
            warnings.warn(f"The lr scheduler dict contains the key(s) ['monitor'], but the keys will be ignored: "
                          f"manual optimization ignores monitor={config.monitor!r}; call lr_scheduler.step(...) "
                          "yourself in training_step.", RuntimeWarning, stacklevel=4)
        return
    torch_api = isinstance(scheduler, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau))
    if not torch_api and not custom_step:
        raise SchedulerAPIError(f"The LR scheduler {type(scheduler).__name__} doesn't follow PyTorch's LRScheduler "
                                "API, so the Trainer cannot step it; override the module's "
                                "lr_scheduler_step(scheduler, metric) to step it.")
    if config.needs_metric and config.monitor is None:
        raise ValueError('ReduceLROnPlateau needs a metric: return {"scheduler": s, "monitor": "val_loss"}.')


def _check_optimizers(optimizers: list[Any]) -> None:
    if not optimizers:
        raise ValueError(f"configure_optimizers() returned no optimizer (an empty optimizer list). {_FIX}.")
    for o in optimizers:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"configure_optimizers() returned {_describe(o)} where an optimizer was expected. {_FIX}.")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}" if len(text) < 120 else type(value).__name__


def step_schedulers(configs: list[LRSchedulerConfig], interval: str, count: int,
                    metrics: dict[str, Any] | None = None, skipped: bool = False, hooks: Any = None,
                    plateau: bool | None = None) -> None:
    """Advance the schedulers of ``interval`` whose ``frequency`` divides ``count``.

    ``skipped`` (an fp16 overflow step) holds back step-interval schedulers, so the LR schedule follows the
    optimizer steps that actually happened. ``plateau`` selects metric-driven schedulers only (True) or the
    others only (False): Lightning steps epoch schedulers before validation and ReduceLROnPlateau after it.
    A module that overrides ``lr_scheduler_step`` does the stepping itself.
    """
    custom = hooks is not None and hooks.module_overrides("lr_scheduler_step")
    for config in configs:
        if config.interval != interval or count % config.frequency:
            continue
        if (interval == "step" and skipped) or (plateau is not None and config.needs_metric != plateau):
            continue
        metric = None
        if config.needs_metric:
            value = (metrics or {}).get(config.monitor)
            if value is None:
                if config.strict:
                    raise RuntimeError(
                        f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged; available: "
                        f"{sorted(metrics or {})}. Log it with self.log or set strict=False."
                    )
                continue
            metric = float(value)
        if custom:
            hooks.module.lr_scheduler_step(config.scheduler, metric)
        elif metric is None:
            config.scheduler.step()
        else:
            config.scheduler.step(metric)
