"""LearningRateMonitor: log every optimizer param group's learning rate (and momentum) to the loggers.

Names follow Lightning so dashboards carry over: ``lr-<OptimizerClass>`` (or the scheduler's
``name``), ``-<k>`` for the k-th further optimizer of the same class, and ``/pg<i>`` (or the group's
``"name"``) when an optimizer has several param groups or its one group is named.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any

from framework.hooks import Callback

if TYPE_CHECKING:
    import torch

    from framework.module import TrainModule
    from framework.trainer import Trainer

_INTERVALS = (None, "step", "epoch")


class LearningRateMonitor(Callback):
    """Logs learning rates at their scheduler's interval.

    ``logging_interval=None`` logs step-interval schedulers' rates on logging steps
    (``trainer.log_every_n_steps``) and epoch-interval ones at each epoch start; ``"step"`` or
    ``"epoch"`` logs all of them at that cadence. Optimizers without a scheduler are logged at both.
    With ``log_momentum``, ``<name>-momentum`` holds ``momentum`` or Adam's ``betas[0]`` (0 when the
    optimizer has neither); with ``log_weight_decay``, ``<name>-weight_decay`` the group's weight decay.
    Every logged value is also kept: ``lrs`` (name → list), ``last_momentum_values``,
    ``last_weight_decay_values``.
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False,
                 log_weight_decay: bool = False) -> None:
        if logging_interval not in _INTERVALS:
            raise ValueError(f"`logging_interval` must be None, 'step' or 'epoch', got {logging_interval!r}.")
        for arg, value in (("log_momentum", log_momentum), ("log_weight_decay", log_weight_decay)):
            if not isinstance(value, bool):
                raise TypeError(f"`{arg}` must be a bool, got {value!r}.")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.log_weight_decay = log_weight_decay
        self.lrs: dict[str, list[float]] = {}
        self.last_momentum_values: dict[str, float | None] = {}
        self.last_weight_decay_values: dict[str, float | None] = {}
        self._last_logged_step: int | None = None

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._last_logged_step = None
        if not trainer.loggers:
            raise ValueError(
                "Cannot use the LearningRateMonitor callback with a Trainer that has no logger "
                "(logger=False); pass logger=True or a Logger, or remove the callback."
            )
        optimizers = [_unwrap(o) for o in trainer.optimizers]
        if self.log_momentum and any("momentum" not in o.defaults and "betas" not in o.defaults for o in optimizers):
            warnings.warn("LearningRateMonitor(log_momentum=True): some optimizers have no momentum; "
                          "0 is logged for them.", RuntimeWarning, stacklevel=2)
        names = self.current_stats(trainer, record=False)
        self.lrs = {name: [] for name in names if not name.endswith(("-momentum", "-weight_decay"))}
        self.last_momentum_values, self.last_weight_decay_values = {}, {}

    def on_train_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int) -> None:
        if self.logging_interval == "epoch" or not trainer.loggers:
            return
        step = trainer.global_step
        # Lightning's cadence; the step check skips the other micro-batches of an accumulation window.
        if (step + 1) % trainer.log_every_n_steps or step == self._last_logged_step:
            return
        self._last_logged_step = step
        self._log(trainer, "step" if self.logging_interval is None else None)

    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self.logging_interval == "step" or not trainer.loggers:
            return
        self._log(trainer, "epoch" if self.logging_interval is None else None)

    def _log(self, trainer: Trainer, interval: str | None) -> None:
        """Log optimizers whose scheduler has ``interval`` (every one when None) and unscheduled ones."""
        stats = self.current_stats(trainer, interval)
        if stats:
            for logger in trainer.loggers:
                logger.log_metrics(stats, step=trainer.global_step)

    def current_stats(self, trainer: Trainer, interval: str | None = None, record: bool = True) -> dict[str, float]:
        """``{name: value}`` for the optimizers selected by ``interval`` (see ``_log``); ``record`` keeps them."""
        scheduler_of = {}
        for config in trainer.lr_scheduler_configs:
            optimizer = getattr(config.scheduler, "optimizer", None)
            if optimizer is None:
                optimizer = _unwrap(trainer.optimizers[getattr(config, "optimizer_index", 0)])
            scheduler_of.setdefault(id(optimizer), config)
        stats: dict[str, float] = {}
        optimizers = [_unwrap(o) for o in trainer.optimizers]
        for optimizer, name in zip(optimizers, self._optimizer_names(optimizers, scheduler_of)):
            config = scheduler_of.get(id(optimizer))
            if config is not None and interval is not None and config.interval != interval:
                continue
            stats.update(self._group_stats(optimizer, name, record))
        return stats

    @staticmethod
    def _optimizer_names(optimizers: list[Any], scheduler_of: dict[int, Any]) -> list[str]:
        per_class: Counter[type] = Counter()
        names = []
        for optimizer in optimizers:
            config = scheduler_of.get(id(optimizer))
            if config is not None and getattr(config, "name", None):
                names.append(config.name)
                continue
            cls = type(optimizer)
            per_class[cls] += 1
            suffix = f"-{per_class[cls] - 1}" if per_class[cls] > 1 else ""
            names.append(f"lr-{cls.__name__}{suffix}")
        return names

    def _group_stats(self, optimizer: torch.optim.Optimizer, name: str, record: bool) -> dict[str, float]:
        groups = optimizer.param_groups
        group_names = [group.get("name", f"pg{i + 1}") for i, group in enumerate(groups)]
        if len(set(group_names)) != len(group_names):
            raise ValueError(
                f"Optimizer {type(optimizer).__name__} has param groups with duplicate names {group_names}; "
                "give each param group a unique 'name' so LearningRateMonitor can log them apart."
            )
        stats = {}
        for group, group_name in zip(groups, group_names):
            key = f"{name}/{group_name}" if len(groups) > 1 or "name" in group else name
            stats[key] = float(group["lr"])
            if record:
                self.lrs.setdefault(key, []).append(stats[key])
            if self.log_momentum:
                momentum = group["betas"][0] if "betas" in group else group.get("momentum", 0.0)
                stats[f"{key}-momentum"] = float(momentum)
                if record:
                    self.last_momentum_values[f"{key}-momentum"] = stats[f"{key}-momentum"]
            if self.log_weight_decay:
                stats[f"{key}-weight_decay"] = float(group.get("weight_decay", 0.0))
                if record:
                    self.last_weight_decay_values[f"{key}-weight_decay"] = stats[f"{key}-weight_decay"]
        return stats


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper (DeepSpeed's engine optimizer, Kiln's manual-optimization one)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and hasattr(inner, "param_groups") else optimizer
