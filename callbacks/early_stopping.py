"""EarlyStopping: stop fitting when a monitored metric stops improving (Lightning 2.5's contract).

The check runs after each validation, or at the end of each training epoch when validation runs once
per epoch (or not at all), reads ``trainer.callback_metrics[monitor]`` (one host read per check, never
per step) and lets every rank stop on the same step through ``strategy.reduce_boolean_decision``.
Messages go to the ``callbacks.early_stopping`` logger at INFO when ``verbose=True``.
"""

from __future__ import annotations

import logging
import math
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from callbacks.base import Callback
from framework.exceptions import MisconfigurationException

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    """Sets ``trainer.should_stop`` after ``patience`` checks without an improvement of ``monitor``.

    An improvement beats ``best_score`` by more than ``min_delta`` in ``mode``'s direction. With
    ``check_finite`` a NaN/inf value stops at once; ``stopping_threshold`` stops once the value is
    better than it, ``divergence_threshold`` once it is worse. With ``strict`` a missing ``monitor``
    raises; otherwise that check is skipped. ``stopped_epoch``, ``wait_count``, ``best_score`` and
    ``patience`` are saved in checkpoints and restored on resume.
    """

    mode_dict = {"min": torch.lt, "max": torch.gt}
    order_dict = {"min": "<", "max": ">"}

    def __init__(self, monitor: str, min_delta: float = 0.0, patience: int = 3, verbose: bool = False,
                 mode: str = "min", strict: bool = True, check_finite: bool = True,
                 stopping_threshold: float | None = None, divergence_threshold: float | None = None,
                 check_on_train_epoch_end: bool | None = None, log_rank_zero_only: bool = False) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"EarlyStopping(monitor={monitor!r}) must be a logged metric name, e.g. 'val_loss'.")
        if mode not in self.mode_dict:
            raise MisconfigurationException(f"`mode` can be min, max, got {mode} (EarlyStopping(mode=...)).")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping(patience={patience!r}) must be an int >= 0 (checks without improvement).")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or math.isnan(min_delta):
            raise ValueError(f"EarlyStopping(min_delta={min_delta!r}) must be a number (the smallest improvement).")
        for name, value in (("stopping_threshold", stopping_threshold), ("divergence_threshold", divergence_threshold)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"EarlyStopping({name}={value!r}) must be a number or None.")
        self.monitor = monitor
        self.patience = patience
        self.verbose = verbose
        self.mode = mode
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.log_rank_zero_only = log_rank_zero_only
        self.wait_count = 0
        self.stopped_epoch = 0
        self._check_on_train_epoch_end = check_on_train_epoch_end
        # Signed as Lightning does: improvement means monitor_op(current - min_delta, best_score).
        self.min_delta = float(min_delta) * (1 if self.monitor_op is torch.gt else -1)
        self.best_score = torch.tensor(math.inf if mode == "min" else -math.inf)

    @property
    def monitor_op(self) -> Callable[..., torch.Tensor]:
        return self.mode_dict[self.mode]

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}{ {'monitor': self.monitor, 'mode': self.mode}!r}"

    @property
    def check_on_train_epoch_end(self) -> bool | None:
        """Whether the check runs at the end of the training epoch (None until ``setup`` decides)."""
        return self._check_on_train_epoch_end

    # ---- when to check -------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: TrainModule, stage: str) -> None:
        if self._check_on_train_epoch_end is None:
            # Validation more often than once per epoch, or less often: check after each validation instead.
            once_per_epoch = trainer.val_check_interval in (None, 1.0)
            self._check_on_train_epoch_end = once_per_epoch and trainer.check_val_every_n_epoch == 1

    def _should_skip_check(self, trainer: Trainer) -> bool:
        return trainer.stage != "fit" or bool(getattr(trainer, "sanity_checking", False))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: TrainModule) -> None:
        if self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._run_early_stopping_check(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: TrainModule) -> None:
        if not self._check_on_train_epoch_end and not self._should_skip_check(trainer):
            self._run_early_stopping_check(trainer)

    # ---- the check ------------------------------------------------------------------------------------
    def _validate_condition_metric(self, logs: dict[str, torch.Tensor]) -> bool:
        if logs.get(self.monitor) is not None:
            return True
        message = (f"Early stopping conditioned on metric `{self.monitor}` which is not available. Pass in or modify "
                   f"your `EarlyStopping` callback to use any of the following: `{'`, `'.join(logs)}`")
        if self.strict:
            raise RuntimeError(message)
        if self.verbose:
            import warnings

            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return False

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        """Evaluate the stopping rules on the monitored value and tell the trainer (every rank alike)."""
        logs = trainer.callback_metrics
        if getattr(trainer, "fast_dev_run", False) or not self._validate_condition_metric(logs):
            return
        current = torch.as_tensor(logs[self.monitor]).detach().squeeze().cpu()
        should_stop, reason = self._evaluate_stopping_criteria(current)
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        op, order = self.monitor_op, self.order_dict[self.mode]
        if self.check_finite and not torch.isfinite(current):
            return True, (f"Monitored metric {self.monitor} = {current} is not finite. Previous best value was "
                          f"{self.best_score:.3f}. Signaling Trainer to stop.")
        if self.stopping_threshold is not None and op(current, self.stopping_threshold):
            return True, (f"Stopping threshold reached: {self.monitor} = {current} {order} {self.stopping_threshold}. "
                          "Signaling Trainer to stop.")
        if self.divergence_threshold is not None and op(-current, -self.divergence_threshold):
            return True, (f"Divergence threshold reached: {self.monitor} = {current} {order} "
                          f"{self.divergence_threshold}. Signaling Trainer to stop.")
        if op(current - self.min_delta, self.best_score.to(current.device)):
            reason = self._improvement_message(current)
            self.best_score, self.wait_count = current, 0
            return False, reason
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (f"Monitored metric {self.monitor} did not improve in the last {self.wait_count} records. "
                          f"Best score: {self.best_score:.3f}. Signaling Trainer to stop.")
        return False, None

    def _improvement_message(self, current: torch.Tensor) -> str:
        if torch.isfinite(self.best_score):
            return (f"Metric {self.monitor} improved by {abs(self.best_score - current):.3f} >= min_delta = "
                    f"{abs(self.min_delta)}. New best score: {current:.3f}")
        return f"Metric {self.monitor} improved. New best score: {current:.3f}"

    @staticmethod
    def _log_info(trainer: Trainer, message: str, log_rank_zero_only: bool) -> None:
        rank = trainer.global_rank if trainer.world_size > 1 else None
        if rank is not None:
            message = f"[rank: {rank}] {message}"
        if rank is None or not log_rank_zero_only or rank == 0:
            log.info(message)

    # ---- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # best_score stays a tensor, as in Lightning: its dtype and value come back exactly (no pickle: safetensors).
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch,
                "best_score": self.best_score.detach().cpu().clone(), "patience": self.patience}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = int(state_dict["wait_count"])
        self.stopped_epoch = int(state_dict["stopped_epoch"])
        best = state_dict["best_score"]  # a number in checkpoints written before it was a tensor
        self.best_score = best.clone() if isinstance(best, torch.Tensor) else torch.tensor(float(best))
        self.patience = int(state_dict.get("patience", self.patience))


# Resolved types, not postponed strings, in the constructor's signature: tools that read it directly
# (jsonargparse, CLI parsers) then see the types Lightning's signature shows.
EarlyStopping.__init__.__annotations__.update(typing.get_type_hints(EarlyStopping.__init__))
