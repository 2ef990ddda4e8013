"""Lightning's EarlyStopping behaviour, end to end on Kiln's Trainer.

Each test restates a behaviour Lightning's own tests pin down (tests/tests_pytorch/callbacks/
test_early_stopping.py): when the check runs, patience counted in checks, thresholds, non-finite
values, several callbacks at once, the state saved in and restored from a real checkpoint.
"""

from __future__ import annotations

import logging
import math
import pickle
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning_boring import Boring

from callbacks import EarlyStopping, ModelCheckpoint
from framework import Trainer
from framework.checkpoint import read_state


class Logs(Boring):
    """Logs ``values[epoch]`` as ``name`` at the end of each validation epoch (or training epoch)."""

    def __init__(self, name: str, values: list[Any], in_training: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name, self.values, self.in_training = name, values, in_training
        self.checks: list[int] = []

    def on_validation_epoch_end(self) -> None:
        if not self.in_training:
            self.log(self.name, self.values[self.current_epoch])

    def on_train_epoch_end(self) -> None:
        if self.in_training:
            self.log(self.name, self.values[self.current_epoch])


def fit(tmp_path, module: Boring, callbacks: list, **kwargs: Any) -> Trainer:
    defaults = dict(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False, max_epochs=20,
                    limit_train_batches=2, limit_val_batches=1, enable_checkpointing=False)
    trainer = Trainer(callbacks=callbacks, **{**defaults, **kwargs})
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize(("values", "patience", "stop_epoch"),
                         [([6, 5, 5, 5, 5, 5], 3, 4), ([6, 5, 4, 4, 3, 3], 1, 3), ([6, 5, 6, 5, 5, 5], 3, 4)])
def test_patience_after_validation(tmp_path, values, patience, stop_epoch):
    callback = EarlyStopping(monitor="test_val_loss", patience=patience, verbose=True)
    trainer = fit(tmp_path, Logs("test_val_loss", [float(v) for v in values]), [callback], max_epochs=10)
    assert trainer.current_epoch - 1 == stop_epoch == callback.stopped_epoch


@pytest.mark.parametrize(("values", "patience", "stop_epoch"), [([6, 5, 5, 5, 5, 5], 3, 4), ([6, 5, 4, 4, 3, 3], 1, 3)])
@pytest.mark.parametrize("with_validation", [True, False])
def test_patience_at_train_epoch_end(tmp_path, values, patience, stop_epoch, with_validation):
    callback = EarlyStopping(monitor="train_loss_e", patience=patience, check_on_train_epoch_end=True)
    module = Logs("train_loss_e", [float(v) for v in values], in_training=True)
    trainer = fit(tmp_path, module, [callback], max_epochs=10, limit_val_batches=1 if with_validation else 0)
    assert trainer.current_epoch - 1 == stop_epoch


@pytest.mark.parametrize(("stopping_threshold", "divergence_threshold", "values", "stop_epoch"), [
    (None, None, [8, 4, 2, 3, 4, 5, 8, 10], 5),
    (2.9, None, [9, 8, 7, 6, 5, 6, 4, 3, 2, 1], 8),
    (None, 15.9, [9, 4, 2, 16, 32, 64], 3),
])
def test_thresholds(tmp_path, stopping_threshold, divergence_threshold, values, stop_epoch):
    callback = EarlyStopping(monitor="abc", stopping_threshold=stopping_threshold,
                             divergence_threshold=divergence_threshold)
    trainer = fit(tmp_path, Logs("abc", [float(v) for v in values]), [callback])
    assert trainer.current_epoch - 1 == stop_epoch


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_monitor_stops(tmp_path, bad):
    callback = EarlyStopping(monitor="val_loss", check_finite=True)
    trainer = fit(tmp_path, Logs("val_loss", [4.0, 3.0, bad, 2.0, 1.0]), [callback], max_epochs=10)
    assert trainer.current_epoch - 1 == 2 == callback.stopped_epoch


@pytest.mark.parametrize("check_on_train_epoch_end", [False, True])
@pytest.mark.parametrize("flip", [False, True])
def test_the_first_of_several_callbacks_to_stop_wins(tmp_path, check_on_train_epoch_end, flip):
    """'abc' never improves (patience 3 -> stops at epoch 3); 'cba' keeps improving."""

    class Two(Boring):
        def _log_both(self) -> None:
            self.log("abc", 1.0)
            self.log("cba", 10.0 - self.current_epoch)

        def on_validation_epoch_end(self) -> None:
            if not check_on_train_epoch_end:
                self._log_both()

        def on_train_epoch_end(self) -> None:
            if check_on_train_epoch_end:
                self._log_both()

    kwargs = dict(check_on_train_epoch_end=check_on_train_epoch_end)
    callbacks = [EarlyStopping("abc", **kwargs), EarlyStopping("cba", patience=3, **kwargs)]
    trainer = fit(tmp_path, Two(), callbacks[::-1] if flip else callbacks)
    assert trainer.current_epoch - 1 == 3


@pytest.mark.parametrize("case", ["val_check_interval", "check_val_every_n_epoch"])
def test_checks_after_each_validation_when_it_is_not_once_per_epoch(tmp_path, case):
    calls = []

    class Spy(EarlyStopping):
        def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
            calls.append(current)
            return len(calls) == 2, "B" if len(calls) == 2 else "A"

    class Module(Boring):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("foo", 1.0)

    kwargs = (dict(val_check_interval=3, limit_train_batches=10, max_epochs=10) if case == "val_check_interval"
              else dict(check_val_every_n_epoch=2, max_epochs=5))
    callback = Spy(monitor="foo")
    trainer = fit(tmp_path, Module(), [callback], **kwargs)
    assert callback.check_on_train_epoch_end is False and len(calls) == 2
    if case == "val_check_interval":
        assert trainer.global_step == 2 * 3
    else:
        assert trainer.current_epoch == 2 * 2


def test_state_is_saved_in_checkpoints_and_restored_on_resume(tmp_path):
    values = [5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9]
    stopper = EarlyStopping(monitor="val_score", patience=3)
    saver = ModelCheckpoint(monitor="step", mode="max", save_top_k=-1, filename="{epoch}")
    fit(tmp_path, Logs("val_score", values), [stopper, saver], max_epochs=7, enable_checkpointing=True)
    assert stopper.stopped_epoch == 4 and stopper.wait_count == 3 and stopper.best_score == 4.0
    saved = read_state(str(tmp_path / "checkpoints" / "epoch=2.ckpt"), "trainer")["callbacks"][stopper.state_key]
    assert saved == {"wait_count": 1, "stopped_epoch": 0, "best_score": 4.0, "patience": 3}

    resumed = EarlyStopping(monitor="val_score", patience=3)
    trainer = Trainer(default_root_dir=str(tmp_path / "again"), logger=False, enable_progress_bar=False,
                      max_epochs=7, limit_train_batches=2, limit_val_batches=1, callbacks=[resumed])
    trainer.fit(Logs("val_score", values), ckpt_path=str(tmp_path / "checkpoints" / "epoch=2.ckpt"))
    # restored wait_count=1: two more checks without improvement (epochs 3, 4) exhaust patience 3
    assert resumed.stopped_epoch == 4 and trainer.current_epoch == 5 and resumed.best_score == 4.0


def test_monitored_value_is_squeezed():
    seen = []

    class Spy(EarlyStopping):
        def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
            seen.append(current)
            return False, ""

    trainer = SimpleNamespace(callback_metrics={"foo": torch.tensor([[[0.0]]])}, should_stop=False, current_epoch=0,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all=True: d))
    Spy(monitor="foo")._run_early_stopping_check(trainer)
    assert len(seen) == 1 and seen[0].shape == () and seen[0] == 0


def test_pickling_keeps_every_attribute():
    callback = EarlyStopping(monitor="foo", patience=5, stopping_threshold=0.1)
    loaded = pickle.loads(pickle.dumps(callback))
    assert vars(loaded).keys() == vars(callback).keys()
    assert all(bool(vars(loaded)[k] == v) for k, v in vars(callback).items())


@pytest.mark.parametrize(("rank_zero_only", "world_size", "rank", "expected"), [
    (False, 1, 0, "bar"), (False, 2, 0, "[rank: 0] bar"), (False, 2, 1, "[rank: 1] bar"),
    (True, 1, 0, "bar"), (True, 2, 0, "[rank: 0] bar"), (True, 2, 1, None),
])
def test_log_info_rank_prefix(caplog, rank_zero_only, world_size, rank, expected):
    trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    with caplog.at_level(logging.INFO, logger="callbacks.early_stopping"):
        EarlyStopping._log_info(trainer, "bar", rank_zero_only)
    assert [r.getMessage() for r in caplog.records] == ([expected] if expected else [])


def test_mode_options():
    with pytest.raises(ValueError, match="`mode` can be min, max, got unknown_option"):
        EarlyStopping(monitor="foo", mode="unknown_option")
