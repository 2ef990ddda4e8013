"""EarlyStopping: patience, modes, min_delta, non-finite values, strictness, rank agreement, state."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from callbacks.early_stopping import EarlyStopping
from framework import Trainer, TrainModule


class FakeStrategy:
    def __init__(self, others_stop: bool = False) -> None:
        self.others_stop = others_stop
        self.calls: list[tuple[bool, bool]] = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.calls.append((decision, all))
        return decision or self.others_stop  # another rank may vote to stop


def make_trainer(num_val_batches=(4,), stage="fit", others_stop=False):
    return SimpleNamespace(
        callback_metrics={},
        should_stop=False,
        current_epoch=0,
        stage=stage,
        num_val_batches=list(num_val_batches),
        is_global_zero=True,
        strategy=FakeStrategy(others_stop),
    )


def run_validations(callback, trainer, values, key="val_loss"):
    """Feed one value per validation; return the index of the check that stopped, or None."""
    for epoch, value in enumerate(values):
        trainer.current_epoch = epoch
        trainer.callback_metrics[key] = torch.tensor(value, dtype=torch.float64)
        callback.on_validation_end(trainer, None)
        callback.on_train_epoch_end(trainer, None)
        if trainer.should_stop:
            return epoch
    return None


@pytest.mark.parametrize(
    ("mode", "values", "patience", "stop_at"),
    [
        ("min", [3.0, 2.0, 2.5, 2.4, 2.3, 1.0], 3, 4),
        ("min", [3.0, 2.0, 1.0, 0.5], 1, None),
        ("max", [0.1, 0.5, 0.4, 0.6, 0.6, 0.6], 2, 5),
        ("min", [1.0, 1.0], 0, 1),
    ],
)
def test_patience_and_mode(mode, values, patience, stop_at):
    callback = EarlyStopping("val_loss", patience=patience, mode=mode)
    trainer = make_trainer()
    assert run_validations(callback, trainer, values) == stop_at
    if stop_at is not None:
        assert callback.stopped_epoch == stop_at


def test_min_delta_requires_a_big_enough_improvement():
    callback = EarlyStopping("val_loss", patience=2, min_delta=0.1)
    trainer = make_trainer()
    assert run_validations(callback, trainer, [1.0, 0.95, 0.91, 0.5]) == 2
    assert callback.best_score == 1.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_stops_at_once(bad):
    callback = EarlyStopping("val_loss", patience=10)
    trainer = make_trainer()
    assert run_validations(callback, trainer, [1.0, bad, 0.1]) == 1
    assert "not finite" in callback.stopping_reason


def test_missing_metric_strict_lists_available_keys():
    callback = EarlyStopping("val_los")
    trainer = make_trainer()
    trainer.callback_metrics = {"val_loss": torch.tensor(1.0), "train_loss": torch.tensor(2.0)}
    with pytest.raises(RuntimeError, match=r"val_los.*\['train_loss', 'val_loss'\]"):
        callback.on_validation_end(trainer, None)


def test_missing_metric_not_strict_skips_the_check():
    callback = EarlyStopping("val_acc", patience=0, strict=False)
    trainer = make_trainer()
    callback.on_validation_end(trainer, None)
    assert not trainer.should_stop and callback.wait_count == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "maximum"}, ValueError, "mode"),
        ({"patience": -1}, ValueError, "patience"),
        ({"patience": 1.5}, ValueError, "patience"),
        ({"min_delta": -0.1}, ValueError, "min_delta"),
        ({"monitor": ""}, TypeError, "monitor"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EarlyStopping(**{"monitor": "val_loss", **kwargs})


def test_checks_on_train_epoch_end_without_validation():
    callback = EarlyStopping("train_loss", patience=1)
    trainer = make_trainer(num_val_batches=())
    trainer.callback_metrics["train_loss"] = torch.tensor(1.0)
    callback.on_validation_end(trainer, None)  # not the hook in use: no validation data
    assert callback.best_score is None
    callback.on_train_epoch_end(trainer, None)
    assert callback.best_score == 1.0
    callback.on_train_epoch_end(trainer, None)
    assert trainer.should_stop


@pytest.mark.parametrize(("num_val_batches", "on_train_end"), [([0], True), ([None], False), ([0, 2], False)])
def test_auto_hook_choice(num_val_batches, on_train_end):
    callback = EarlyStopping("m")
    trainer = make_trainer(num_val_batches=num_val_batches)
    assert callback._checks_on_train_epoch_end(trainer) is on_train_end


def test_explicit_check_on_train_epoch_end_overrides_auto():
    callback = EarlyStopping("m", patience=0, check_on_train_epoch_end=True)
    trainer = make_trainer(num_val_batches=(3,))
    trainer.callback_metrics["m"] = torch.tensor(1.0)
    callback.on_validation_end(trainer, None)
    assert callback.best_score is None
    callback.on_train_epoch_end(trainer, None)
    assert callback.best_score == 1.0


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_no_check_outside_fit(stage):
    callback = EarlyStopping("val_loss", patience=0)
    trainer = make_trainer(stage=stage)
    trainer.callback_metrics["val_loss"] = torch.tensor(math.nan)
    callback.on_validation_end(trainer, None)
    assert not trainer.should_stop


def test_decision_goes_through_the_strategy():
    callback = EarlyStopping("val_loss", patience=5)
    trainer = make_trainer(others_stop=True)
    trainer.callback_metrics["val_loss"] = torch.tensor(1.0)
    callback.on_validation_end(trainer, None)
    assert trainer.strategy.calls == [(False, False)]  # any rank voting stop stops all
    assert trainer.should_stop and callback.stopped_epoch == 0


def test_state_dict_round_trip_continues_patience():
    callback = EarlyStopping("val_loss", patience=3)
    trainer = make_trainer()
    run_validations(callback, trainer, [1.0, 0.5, 0.6, 0.7])
    state = callback.state_dict()
    assert state == {"wait_count": 2, "best_score": 0.5, "stopped_epoch": None}
    assert all(isinstance(v, (int, float, type(None))) for v in state.values())
    resumed = EarlyStopping("val_loss", patience=3)
    resumed.load_state_dict(state)
    trainer = make_trainer()
    assert run_validations(resumed, trainer, [0.8]) == 0  # third check without improvement


def test_state_key_tells_monitors_apart():
    assert EarlyStopping("a").state_key != EarlyStopping("b").state_key
    assert EarlyStopping("a").state_key != EarlyStopping("a", mode="max").state_key


def test_verbose_reports_on_stderr(capsys):
    callback = EarlyStopping("val_loss", patience=0, verbose=True)
    run_validations(callback, make_trainer(), [1.0, 2.0])
    err = capsys.readouterr().err
    assert "val_loss" in err and "Stopping" in err


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=20),
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.5]),
)
def test_stops_exactly_after_patience_checks_without_improvement(values, patience, min_delta):
    # Reference: check k stops when the last improvement (a value below the running best by
    # more than min_delta) happened at least `patience` checks ago (and at least one check ago).
    best, last_improvement, expected = math.inf, 0, None
    for k, value in enumerate(values):
        if k == 0 or value < best - min_delta:
            best, last_improvement = value, k
        elif k - last_improvement >= max(patience, 1):
            expected = k
            break
    callback = EarlyStopping("val_loss", patience=patience, min_delta=min_delta)
    assert run_validations(callback, make_trainer(), values) == expected


# ---- end to end with a real Trainer ----------------------------------------------------------------


class ScriptedMetric(TrainModule):
    """Logs ``values[epoch]`` as ``metric`` from validation (or from training when ``in_training``)."""

    def __init__(self, values, in_training=False):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.values, self.in_training, self.epochs_run = values, in_training, 0

    def on_train_epoch_start(self):
        self.epochs_run += 1

    def training_step(self, batch, batch_idx):
        if self.in_training:
            self.log("metric", float(self.values[self.current_epoch]), on_step=False, on_epoch=True)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        if not self.in_training:
            self.log("metric", float(self.values[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_scripted(module, callback, validate=True):
    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = Trainer(
        max_epochs=len(module.values),
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, loader, loader if validate else None)
    return trainer


def test_fit_stops_after_patience_epochs_without_improvement():
    callback = EarlyStopping("metric", patience=2)
    module = ScriptedMetric([3.0, 2.0, 1.0, 1.5, 1.2, 0.1, 0.1, 0.1])
    fit_scripted(module, callback)
    assert module.epochs_run == 5 and callback.stopped_epoch == 4
    assert callback.best_score == 1.0


def test_fit_without_validation_checks_training_epoch_metric():
    callback = EarlyStopping("metric", patience=1, mode="max")
    module = ScriptedMetric([0.5, 0.4, 0.9, 0.9], in_training=True)
    fit_scripted(module, callback, validate=False)
    assert module.epochs_run == 2 and callback.stopped_epoch == 1


def test_fit_runs_to_the_end_while_improving():
    module = ScriptedMetric([3.0, 2.0, 1.0])
    trainer = fit_scripted(module, EarlyStopping("metric", patience=0))
    assert module.epochs_run == 3 and not trainer.should_stop


def test_fit_with_missing_metric_raises():
    with pytest.raises(RuntimeError, match=r"`val_acc`.*\['metric'\]"):
        fit_scripted(ScriptedMetric([1.0, 1.0]), EarlyStopping("val_acc"))
