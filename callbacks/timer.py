"""Timer: time each stage and stop training once ``duration`` has elapsed (``Trainer(max_time=...)``).

The elapsed training time is saved in checkpoints, so a resumed run keeps counting from where it was.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from framework.hooks import Callback

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

STAGES = ("train", "sanity_check", "validate", "test", "predict")
_DURATION = re.compile(r"(\d+):(\d\d):(\d\d):(\d\d)")


def parse_duration(duration: str | timedelta | dict[str, int] | None, argument: str = "duration") -> float | None:
    """Seconds from ``"DD:HH:MM:SS"``, a ``timedelta`` or a dict of ``timedelta`` keyword arguments."""
    if duration is None:
        return None
    if isinstance(duration, str):
        match = _DURATION.fullmatch(duration.strip())
        if not match:
            raise ValueError(f"`{argument}={duration!r}` is not a valid duration; use a string 'DD:HH:MM:SS' "
                             "(e.g. '00:12:00:00'), a datetime.timedelta, or a dict such as {'hours': 12}.")
        days, hours, minutes, seconds = map(int, match.groups())
        duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(duration, dict):
        try:
            duration = timedelta(**duration)
        except TypeError as err:
            raise ValueError(f"`{argument}={duration!r}` has keys timedelta does not take ({err}); use e.g. "
                             "{'days': 1, 'hours': 2}.") from None
    if not isinstance(duration, timedelta):
        raise TypeError(f"`{argument}` must be a 'DD:HH:MM:SS' string, a timedelta or a dict, got {duration!r}.")
    return duration.total_seconds()


class Timer(Callback):
    """Tracks time per stage; with ``duration`` it sets ``trainer.should_stop`` once training took that long.

    ``interval="step"`` checks after every training batch, ``"epoch"`` at each epoch end. ``verbose``
    prints a line when the limit is reached. ``time_elapsed(stage)``/``time_remaining(stage)``/
    ``start_time(stage)``/``end_time(stage)`` take ``"train"``, ``"validate"``, ``"test"``, ``"predict"``.
    """

    def __init__(self, duration: str | timedelta | dict[str, int] | None = None, interval: str = "step",
                 verbose: bool = True) -> None:
        if interval not in ("step", "epoch"):
            raise ValueError(f"Timer(interval={interval!r}) is not supported; use 'step' or 'epoch'.")
        self._duration = parse_duration(duration)
        self._interval = interval
        self._verbose = verbose
        self._start_time: dict[str, float | None] = dict.fromkeys(STAGES)
        self._end_time: dict[str, float | None] = dict.fromkeys(STAGES)
        self._offset = 0.0

    @staticmethod
    def _stage(stage: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"Timer stage {stage!r} is not one of {STAGES}.")
        return stage

    def start_time(self, stage: str = "train") -> float | None:
        """``time.monotonic()`` when ``stage`` last started (None if it has not)."""
        return self._start_time[self._stage(stage)]

    def end_time(self, stage: str = "train") -> float | None:
        """``time.monotonic()`` when ``stage`` last ended (None while running or never run)."""
        return self._end_time[self._stage(stage)]

    def time_elapsed(self, stage: str = "train") -> float:
        """Seconds spent in ``stage``; training time includes what a restored checkpoint had used."""
        start, end = self.start_time(stage), self.end_time(stage)
        offset = self._offset if stage == "train" else 0.0
        if start is None:
            return offset
        return (time.monotonic() if end is None else end) - start + offset

    def time_remaining(self, stage: str = "train") -> float | None:
        """Seconds left of ``duration`` (None without a duration)."""
        return None if self._duration is None else self._duration - self.time_elapsed(stage)

    def _begin(self, stage: str) -> None:
        self._start_time[stage], self._end_time[stage] = time.monotonic(), None

    def _finish(self, stage: str) -> None:
        self._end_time[stage] = time.monotonic()

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._begin("train")

    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._finish("train")

    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._begin("sanity_check" if getattr(trainer, "sanity_checking", False) else "validate")

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._finish("sanity_check" if getattr(trainer, "sanity_checking", False) else "validate")

    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._begin("test")

    def on_test_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._finish("test")

    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._begin("predict")

    def on_predict_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._finish("predict")

    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self._duration is not None:
            self._check_time_remaining(trainer)

    def on_train_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._interval == "step" and self._duration is not None:
            self._check_time_remaining(trainer)

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._interval == "epoch" and self._duration is not None:
            self._check_time_remaining(trainer)

    def _check_time_remaining(self, trainer: Trainer) -> None:
        should_stop = self.time_elapsed("train") >= self._duration
        if trainer.world_size > 1:  # every rank stops at the same batch
            should_stop = bool(trainer.strategy.broadcast(should_stop))
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop and self._verbose and trainer.is_global_zero:
            elapsed = timedelta(seconds=int(self.time_elapsed("train")))
            print(f"Time limit reached. Elapsed time is {elapsed}. Signaling Trainer to stop.", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"time_elapsed": {stage: self.time_elapsed(stage) for stage in STAGES}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._offset = float(state_dict.get("time_elapsed", {}).get("train", 0.0))
