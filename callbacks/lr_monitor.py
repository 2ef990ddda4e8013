"""LearningRateMonitor: log every optimizer param group's learning rate (and momentum) to the loggers.

Names follow Lightning so dashboards carry over: ``lr-<OptimizerClass>`` (or the scheduler's
``name``), ``-<k>`` for the k-th further optimizer of the same class, and ``/pg<i>`` (or the group's
``"name"``) when an optimizer has several param groups.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any

from callbacks.base import Callback

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
    With ``log_momentum``, ``<name>-momentum`` holds ``momentum`` or Adam's ``betas[0]``.
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False) -> None:
        if logging_interval not in _INTERVALS:
            raise ValueError(f"`logging_interval` must be None, 'step' or 'epoch', got {logging_interval!r}.")
        if not isinstance(log_momentum, bool):
            raise TypeError(f"`log_momentum` must be a bool, got {log_momentum!r}.")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self._warned_no_loggers = False
        self._last_logged_step: int | None = None

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._last_logged_step = None
        if not trainer.loggers and not self._warned_no_loggers:
            self._warned_no_loggers = True
            warnings.warn(
                "LearningRateMonitor has no logger to write to (Trainer(logger=False)); it logs nothing. "
                "Pass logger=True or a Logger to the Trainer to record learning rates.",
                UserWarning,
                stacklevel=2,
            )

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

    def current_stats(self, trainer: Trainer, interval: str | None = None) -> dict[str, float]:
        """``{name: value}`` for the optimizers selected by ``interval`` (see ``_log``)."""
        scheduler_of = {}
        for config in trainer.lr_scheduler_configs:
            optimizer = getattr(config.scheduler, "optimizer", None)
            if optimizer is None:
                optimizer = trainer.optimizers[getattr(config, "optimizer_index", 0)]
            scheduler_of.setdefault(id(optimizer), config)
        stats: dict[str, float] = {}
        for optimizer, name in zip(trainer.optimizers, self._optimizer_names(trainer, scheduler_of)):
            config = scheduler_of.get(id(optimizer))
            if config is not None and interval is not None and config.interval != interval:
                continue
            stats.update(self._group_stats(optimizer, name))
        return stats

    @staticmethod
    def _optimizer_names(trainer: Trainer, scheduler_of: dict[int, Any]) -> list[str]:
        per_class: Counter[type] = Counter()
        names = []
        for optimizer in trainer.optimizers:
            config = scheduler_of.get(id(optimizer))
            if config is not None and getattr(config, "name", None):
                names.append(config.name)
                continue
            cls = type(optimizer)
            per_class[cls] += 1
            suffix = f"-{per_class[cls] - 1}" if per_class[cls] > 1 else ""
            names.append(f"lr-{cls.__name__}{suffix}")
        return names

    def _group_stats(self, optimizer: torch.optim.Optimizer, name: str) -> dict[str, float]:
        groups = optimizer.param_groups
        group_names = [group.get("name", f"pg{i + 1}") for i, group in enumerate(groups)]
        if len(set(group_names)) != len(group_names):
            raise ValueError(
                f"Optimizer {type(optimizer).__name__} has param groups with duplicate names {group_names}; "
                "give each param group a unique 'name' so LearningRateMonitor can log them apart."
            )
        stats = {}
        for group, group_name in zip(groups, group_names):
            key = f"{name}/{group_name}" if len(groups) > 1 else name
            stats[key] = float(group["lr"])
            if self.log_momentum:
                momentum = group["betas"][0] if "betas" in group else group.get("momentum", 0.0)
                stats[f"{key}-momentum"] = float(momentum)
        return stats
