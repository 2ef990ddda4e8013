"""EarlyStopping: stop fitting when a monitored metric stops improving.

The check runs once per validation (or per training epoch when there is no validation), reads the
monitored value from ``trainer.callback_metrics`` and asks every rank through
``strategy.reduce_boolean_decision`` so that all processes stop on the same step.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

from callbacks.base import Callback

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

_MODES = ("min", "max")


class EarlyStopping(Callback):
    """Sets ``trainer.should_stop`` after ``patience`` checks without an improvement of ``monitor``.

    An improvement means beating the best value by more than ``min_delta`` in the direction of
    ``mode``. A NaN or infinite value stops at once. With ``strict``, a missing ``monitor`` key raises;
    otherwise that check is skipped. ``check_on_train_epoch_end=None`` checks after each validation,
    or at the end of each training epoch when the fit has no validation data.
    """

    def __init__(
        self,
        monitor: str,
        patience: int = 3,
        mode: str = "min",
        min_delta: float = 0.0,
        check_on_train_epoch_end: bool | None = None,
        strict: bool = True,
        verbose: bool = False,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(
                f"`monitor` must be a metric name, got {monitor!r}. Pass e.g. monitor='val_loss'."
            )
        if mode not in _MODES:
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"`patience` must be an int >= 0, got {patience!r}.")
        if not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise ValueError(f"`min_delta` must be a number >= 0, got {min_delta!r}.")
        self.monitor = monitor
        self.patience = patience
        self.mode = mode
        self.min_delta = float(min_delta)
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.strict = strict
        self.verbose = verbose
        self.wait_count = 0
        self.best_score: float | None = None
        self.stopped_epoch: int | None = None
        self.stopping_reason: str | None = None

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{monitor={self.monitor!r}, mode={self.mode!r}}}"

    # ---- when to check ----------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._checks_on_train_epoch_end(trainer):
            self._run_check(trainer)

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if not self._checks_on_train_epoch_end(trainer):
            self._run_check(trainer)

    def _checks_on_train_epoch_end(self, trainer: Trainer) -> bool:
        if self.check_on_train_epoch_end is not None:
            return self.check_on_train_epoch_end
        return not any(n is None or n > 0 for n in (trainer.num_val_batches or ()))

    # ---- the check ---------------------------------------------------------------------------
    def _run_check(self, trainer: Trainer) -> None:
        if trainer.stage != "fit" or getattr(trainer, "sanity_checking", False):
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            if self.strict:
                raise RuntimeError(
                    f"EarlyStopping is monitoring `{self.monitor}`, which was not logged. Available "
                    f"metrics: {sorted(metrics)}. Log it with self.log({self.monitor!r}, ...) or pass "
                    "strict=False to skip checks where it is missing."
                )
            return
        current = float(metrics[self.monitor])  # one host sync per check, not per step
        should_stop, reason = self._evaluate(current)
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        if should_stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason = reason or "another rank decided to stop"
        if reason and self.verbose and trainer.is_global_zero:
            print(f"EarlyStopping: {reason}", file=sys.stderr)

    def _evaluate(self, current: float) -> tuple[bool, str | None]:
        if not math.isfinite(current):
            return True, f"`{self.monitor}` = {current} is not finite; stopping."
        if self._improved(current):
            old, self.best_score, self.wait_count = self.best_score, current, 0
            if old is None:
                return False, f"`{self.monitor}` = {current:.6g} (first value)."
            return False, f"`{self.monitor}` improved by {abs(current - old):.6g} to {current:.6g}."
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (
                f"`{self.monitor}` did not improve in the last {self.wait_count} checks; best "
                f"{self.best_score:.6g}. Stopping."
            )
        return False, None

    def _improved(self, current: float) -> bool:
        if self.best_score is None:
            return True
        if self.mode == "min":
            return current < self.best_score - self.min_delta
        return current > self.best_score + self.min_delta

    # ---- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "wait_count": self.wait_count,
            "best_score": self.best_score,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = int(state_dict["wait_count"])
        best = state_dict["best_score"]
        self.best_score = None if best is None else float(best)
        stopped = state_dict["stopped_epoch"]
        self.stopped_epoch = None if stopped is None else int(stopped)
