"""EarlyStopping: patience, modes, min_delta, non-finite values, strictness, rank agreement, state."""

from __future__ import annotations

import logging
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


def make_trainer(stage="fit", others_stop=False, val_check_interval=None, check_val_every_n_epoch=1,
                 world_size=1, global_rank=0):
    return SimpleNamespace(
        callback_metrics={}, should_stop=False, current_epoch=0, stage=stage, is_global_zero=global_rank == 0,
        strategy=FakeStrategy(others_stop), val_check_interval=val_check_interval,
        check_val_every_n_epoch=check_val_every_n_epoch, world_size=world_size, global_rank=global_rank,
    )


def ready(callback, trainer):
    callback.setup(trainer, None, "fit")
    return callback


def run_validations(callback, trainer, values, key="val_loss"):
    """Feed one value per validation; return the index of the check that stopped, or None."""
    ready(callback, trainer)
    for epoch, value in enumerate(values):
        trainer.current_epoch = epoch
        trainer.callback_metrics[key] = torch.tensor(value, dtype=torch.float32)
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
    assert run_validations(callback, make_trainer(), values) == stop_at
    assert callback.stopped_epoch == (stop_at or 0)  # Lightning: 0 until it stops


def test_defaults_and_initial_state_match_lightning():
    callback = EarlyStopping("val_loss")
    assert (callback.patience, callback.min_delta, callback.mode, callback.strict, callback.check_finite) == (
        3, 0.0, "min", True, True)
    assert callback.stopping_threshold is None and callback.divergence_threshold is None
    assert callback.wait_count == 0 and callback.stopped_epoch == 0
    assert torch.isinf(callback.best_score) and callback.best_score > 0
    assert EarlyStopping("acc", mode="max").best_score == -math.inf


def test_min_delta_requires_a_big_enough_improvement():
    callback = EarlyStopping("val_loss", patience=2, min_delta=0.1)
    assert run_validations(callback, make_trainer(), [1.0, 0.95, 0.91, 0.5]) == 2
    assert callback.best_score == 1.0
    assert callback.min_delta == -0.1  # signed by mode, as Lightning stores it


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_stops_at_once(bad, caplog):
    callback = EarlyStopping("val_loss", patience=10, verbose=True)
    with caplog.at_level(logging.INFO, logger="callbacks.early_stopping"):
        assert run_validations(callback, make_trainer(), [1.0, bad, 0.1]) == 1
    assert f"Monitored metric val_loss = {torch.tensor(bad)} is not finite. Previous best value was 1.000." in caplog.text


def test_check_finite_false_lets_nan_count_as_no_improvement():
    callback = EarlyStopping("val_loss", patience=2, check_finite=False)
    assert run_validations(callback, make_trainer(), [1.0, math.nan, math.nan, 0.1]) == 2


@pytest.mark.parametrize(("mode", "threshold", "values", "stop_at"), [
    ("min", 0.5, [2.0, 1.0, 0.4, 0.1], 2),  # better than the threshold: done
    ("max", 0.9, [0.5, 0.95, 0.99], 1),
    ("min", 0.5, [2.0, 0.5, 0.1], 2),  # reaching it exactly is not beyond it
])
def test_stopping_threshold(mode, threshold, values, stop_at, caplog):
    callback = EarlyStopping("val_loss", mode=mode, patience=10, stopping_threshold=threshold, verbose=True)
    with caplog.at_level(logging.INFO, logger="callbacks.early_stopping"):
        assert run_validations(callback, make_trainer(), values) == stop_at
    assert "Stopping threshold reached: val_loss = " in caplog.text and "Signaling Trainer to stop." in caplog.text


@pytest.mark.parametrize(("mode", "threshold", "values", "stop_at"), [
    ("min", 5.0, [2.0, 1.0, 6.0, 0.1], 2),  # worse than the threshold: diverged
    ("max", 0.1, [0.5, 0.4, 0.05], 2),
])
def test_divergence_threshold(mode, threshold, values, stop_at, caplog):
    callback = EarlyStopping("val_loss", mode=mode, patience=10, divergence_threshold=threshold, verbose=True)
    with caplog.at_level(logging.INFO, logger="callbacks.early_stopping"):
        assert run_validations(callback, make_trainer(), values) == stop_at
    assert "Divergence threshold reached: val_loss = " in caplog.text


def test_improvement_and_patience_messages(caplog):
    callback = EarlyStopping("val_loss", patience=1, min_delta=0.01, verbose=True)
    with caplog.at_level(logging.INFO, logger="callbacks.early_stopping"):
        run_validations(callback, make_trainer(), [1.0, 0.5, 0.7])
    assert "Metric val_loss improved. New best score: 1.000" in caplog.text
    assert "Metric val_loss improved by 0.500 >= min_delta = 0.01. New best score: 0.500" in caplog.text
    assert "Monitored metric val_loss did not improve in the last 1 records. Best score: 0.500. " in caplog.text


@pytest.mark.parametrize(("rank_zero_only", "rank", "logged"), [(False, 1, True), (True, 1, False), (True, 0, True)])
def test_log_rank_zero_only_and_rank_prefix(rank_zero_only, rank, logged, caplog):
    callback = EarlyStopping("val_loss", patience=0, verbose=True, log_rank_zero_only=rank_zero_only)
    with caplog.at_level(logging.INFO, logger="callbacks.early_stopping"):
        run_validations(callback, make_trainer(world_size=2, global_rank=rank), [1.0])
    assert (f"[rank: {rank}] Metric val_loss improved." in caplog.text) is logged


def test_missing_metric_strict_lists_available_keys():
    callback = ready(EarlyStopping("val_los", check_on_train_epoch_end=False), make_trainer())
    trainer = make_trainer()
    trainer.callback_metrics = {"val_loss": torch.tensor(1.0), "train_loss": torch.tensor(2.0)}
    with pytest.raises(RuntimeError, match=r"metric `val_los` which is not available.*`val_loss`, `train_loss`"):
        callback.on_validation_end(trainer, None)


def test_missing_metric_not_strict_skips_the_check_and_warns_when_verbose():
    callback = ready(EarlyStopping("val_acc", patience=0, strict=False, verbose=True,
                                   check_on_train_epoch_end=False), make_trainer())
    trainer = make_trainer()
    with pytest.warns(RuntimeWarning, match="val_acc"):
        callback.on_validation_end(trainer, None)
    assert not trainer.should_stop and callback.wait_count == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "maximum"}, ValueError, "mode"),
        ({"patience": -1}, ValueError, "patience"),
        ({"patience": 1.5}, ValueError, "patience"),
        ({"min_delta": "0.1"}, ValueError, "min_delta"),
        ({"stopping_threshold": "1"}, ValueError, "stopping_threshold"),
        ({"monitor": ""}, TypeError, "monitor"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EarlyStopping(**{"monitor": "val_loss", **kwargs})


@pytest.mark.parametrize(("val_check_interval", "every_n_epoch", "on_train_end"),
                         [(None, 1, True), (1.0, 1, True), (0.5, 1, False), (10, 1, False), (None, 2, False)])
def test_auto_hook_choice_follows_lightning(val_check_interval, every_n_epoch, on_train_end):
    callback = EarlyStopping("m")
    assert callback.check_on_train_epoch_end is None
    ready(callback, make_trainer(val_check_interval=val_check_interval, check_val_every_n_epoch=every_n_epoch))
    assert callback.check_on_train_epoch_end is on_train_end


@pytest.mark.parametrize("explicit", [True, False])
def test_explicit_check_on_train_epoch_end_picks_the_hook(explicit):
    trainer = make_trainer()
    callback = ready(EarlyStopping("m", patience=0, check_on_train_epoch_end=explicit), trainer)
    trainer.callback_metrics["m"] = torch.tensor(1.0)
    (callback.on_validation_end if explicit else callback.on_train_epoch_end)(trainer, None)
    assert torch.isinf(callback.best_score)  # the other hook does nothing
    (callback.on_train_epoch_end if explicit else callback.on_validation_end)(trainer, None)
    assert callback.best_score == 1.0


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_no_check_outside_fit(stage):
    trainer = make_trainer(stage=stage)
    callback = ready(EarlyStopping("val_loss", patience=0), trainer)
    trainer.callback_metrics["val_loss"] = torch.tensor(math.nan)
    callback.on_validation_end(trainer, None)
    callback.on_train_epoch_end(trainer, None)
    assert not trainer.should_stop


def test_decision_goes_through_the_strategy():
    trainer = make_trainer(others_stop=True)
    callback = ready(EarlyStopping("val_loss", patience=5), trainer)
    trainer.callback_metrics["val_loss"] = torch.tensor(1.0)
    callback.on_train_epoch_end(trainer, None)
    assert trainer.strategy.calls == [(False, False)]  # any rank voting stop stops all
    assert trainer.should_stop and callback.stopped_epoch == 0


def test_state_dict_round_trip_continues_patience():
    callback = EarlyStopping("val_loss", patience=3)
    run_validations(callback, make_trainer(), [1.0, 0.5, 0.6, 0.7])
    state = callback.state_dict()
    assert state == {"wait_count": 2, "best_score": 0.5, "stopped_epoch": 0, "patience": 3}
    assert isinstance(state["best_score"], torch.Tensor)  # Lightning's form; Kiln stores it without pickle
    resumed = EarlyStopping("val_loss", patience=3)
    resumed.load_state_dict(state)
    assert resumed.best_score == 0.5 and resumed.wait_count == 2
    assert run_validations(resumed, make_trainer(), [0.8]) == 0  # third check without improvement
    older = EarlyStopping("val_loss", patience=3)
    older.load_state_dict({**state, "best_score": 0.5})  # written when best_score was saved as a number
    assert older.best_score == 0.5


def test_a_float64_best_score_survives_a_checkpoint_bit_exact():
    callback, trainer = EarlyStopping("val_loss", patience=3), make_trainer()
    ready(callback, trainer)
    trainer.callback_metrics["val_loss"] = torch.tensor(0.1, dtype=torch.float64)
    callback.on_validation_end(trainer, None)
    callback.on_train_epoch_end(trainer, None)
    assert callback.best_score.dtype == torch.float64
    resumed = EarlyStopping("val_loss", patience=3)
    resumed.load_state_dict(callback.state_dict())
    assert resumed.best_score.dtype == torch.float64 and torch.equal(resumed.best_score, callback.best_score)


def test_state_key_is_lightnings_and_tells_monitors_apart():
    assert EarlyStopping("a").state_key == "EarlyStopping{'monitor': 'a', 'mode': 'min'}"
    assert EarlyStopping("a").state_key != EarlyStopping("b").state_key
    assert EarlyStopping("a").state_key != EarlyStopping("a", mode="max").state_key


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=20),
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.5]),
)
def test_stops_exactly_after_patience_checks_without_improvement(values, patience, min_delta):
    # Reference: check k stops when the last improvement (a value below the running best by
    # more than min_delta) happened at least `patience` checks ago (and at least one check ago).
    best, last_improvement, expected = math.inf, 0, None
    for k, value in enumerate(values):
        if k == 0 or value + min_delta < best:
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
    assert callback.best_score == 1.0 and callback.wait_count == 2


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
    with pytest.raises(RuntimeError, match=r"`val_acc` which is not available.*`metric`"):
        fit_scripted(ScriptedMetric([1.0, 1.0]), EarlyStopping("val_acc"))
