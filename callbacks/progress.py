"""ProgressBar: tqdm bars for training, validation, test and predict, on global rank 0 only.

It runs in every training step by default, so the per-batch hook only counts and compares a
monotonic clock; the bar is redrawn (and the loss read from the device) at most every
``min_interval`` seconds and every ``refresh_rate`` batches. tqdm is imported when a bar is opened.
"""

from __future__ import annotations

import sys
from time import monotonic
from typing import TYPE_CHECKING, Any

from framework.hooks import Callback

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer


class _Bar:
    """A tqdm bar plus the cheap counters that decide when to redraw it."""

    __slots__ = ("tqdm", "count", "next_count", "next_time")

    def __init__(self, tqdm_bar: Any) -> None:
        self.tqdm = tqdm_bar
        self.count = 0
        self.next_count = 1
        self.next_time = 0.0


class ProgressBar(Callback):
    """Shows epoch, step, loss (``trainer.last_loss``) and ``prog_bar=True`` metrics on stderr.

    ``refresh_rate`` is the least number of batches between redraws (0 disables the bar);
    ``min_interval`` the least seconds between them. ``leave`` keeps one finished line per epoch.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False, min_interval: float = 0.1) -> None:
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ValueError(
                f"`refresh_rate` must be an int >= 0 (0 disables the bar), got {refresh_rate!r}."
            )
        if not isinstance(min_interval, (int, float)) or min_interval < 0:
            raise ValueError(f"`min_interval` must be a number of seconds >= 0, got {min_interval!r}.")
        self.refresh_rate = refresh_rate
        self.leave = leave
        self.min_interval = float(min_interval)
        self.process_position = 0
        self._train: _Bar | None = None
        self._eval: _Bar | None = None

    def _enabled(self, trainer: Trainer) -> bool:
        return self.refresh_rate > 0 and trainer.is_global_zero

    def _open(self, desc: str, total: int | None, position: int, leave: bool) -> _Bar:
        from tqdm.std import tqdm

        bar = tqdm(
            desc=desc,
            total=total,
            position=position + self.process_position,
            leave=leave,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.0,  # throttling happens here, before tqdm is called at all
            miniters=1,
            smoothing=0.1,
        )
        return _Bar(bar)

    def _advance(self, bar: _Bar, postfix: str) -> None:
        """Redraw ``bar`` at its current count with ``postfix`` and schedule the next redraw."""
        bar.tqdm.set_postfix_str(postfix, refresh=False)
        if bar.count != bar.tqdm.n:
            bar.tqdm.update(bar.count - bar.tqdm.n)  # draws (miniters=1, mininterval=0) and tracks the rate
        else:
            bar.tqdm.refresh()
        bar.next_count = bar.count + self.refresh_rate
        bar.next_time = monotonic() + self.min_interval

    # ---- training ---------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        if not self._enabled(trainer):
            return
        desc, total = f"Epoch {trainer.current_epoch}", trainer.num_training_batches
        if self._train is None:
            self._train = self._open(desc, total, position=0, leave=True)
        else:  # one bar reused across epochs unless each epoch's line is kept
            self._train.tqdm.set_description_str(desc, refresh=False)
            self._train.tqdm.reset(total=total)
            self._train.count, self._train.next_count, self._train.next_time = 0, 1, 0.0

    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self._train
        if bar is None:
            return
        bar.count += 1
        if bar.count >= bar.next_count and monotonic() >= bar.next_time:
            self._advance(bar, self._train_postfix(trainer))

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._train is not None:
            self._advance(self._train, self._train_postfix(trainer))
            if self.leave:
                self._close_train()

    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._close_train()

    def _train_postfix(self, trainer: Trainer) -> str:
        parts = [f"step={trainer.global_step}"]
        if trainer.last_loss is not None:
            parts.append(f"loss={_format(trainer.last_loss)}")
        parts.extend(f"{name}={_format(value)}" for name, value in trainer.progress_bar_metrics.items())
        return ", ".join(parts)

    def _close_train(self) -> None:
        if self._train is not None:
            self._train.tqdm.close()
            self._train = None

    # ---- validation, test, predict ---------------------------------------------------------
    def _start_eval(self, trainer: Trainer, desc: str, totals: list[int | None] | None) -> None:
        if not self._enabled(trainer):
            return
        self._close_eval()
        total = sum(totals) if totals and all(n is not None for n in totals) else None
        nested = self._train is not None
        self._eval = self._open(desc, total, position=1 if nested else 0, leave=not nested and self.leave)

    def _eval_batch_end(self, trainer: Trainer) -> None:
        bar = self._eval
        if bar is None:
            return
        bar.count += 1
        if bar.count >= bar.next_count and monotonic() >= bar.next_time:
            self._advance(bar, "")

    def _end_eval(self, trainer: Trainer) -> None:
        if self._eval is not None:
            self._advance(self._eval, "")
            self._close_eval()
        if self._train is not None:  # show the new validation metrics on the training bar
            self._advance(self._train, self._train_postfix(trainer))

    def _close_eval(self) -> None:
        if self._eval is not None:
            self._eval.tqdm.close()
            self._eval = None

    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        if not getattr(trainer, "sanity_checking", False):
            self._start_eval(trainer, "Validation", trainer.num_val_batches)

    def on_validation_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._eval_batch_end(trainer)

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._end_eval(trainer)

    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._start_eval(trainer, "Testing", getattr(trainer, "num_test_batches", None))

    def on_test_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._eval_batch_end(trainer)

    def on_test_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._end_eval(trainer)

    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._start_eval(trainer, "Predicting", getattr(trainer, "num_predict_batches", None))

    def on_predict_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._eval_batch_end(trainer)

    def on_predict_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._end_eval(trainer)

    # ---- always close --------------------------------------------------------------------------
    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        self._close_eval()
        self._close_train()

    def teardown(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        self._close_eval()
        self._close_train()


def _format(value: Any) -> str:
    try:
        return f"{float(value):.4g}"  # a host sync, but only when the bar redraws
    except (TypeError, ValueError, RuntimeError):
        return str(value)


class TQDMProgressBar(ProgressBar):
    """Lightning's name and arguments: ``process_position`` shifts the bars down that many lines (for
    several trainers in one terminal)."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        if isinstance(process_position, bool) or not isinstance(process_position, int) or process_position < 0:
            raise ValueError(f"`process_position` must be an int >= 0, got {process_position!r}.")
        self.process_position = process_position
