"""self.log aggregation: defaults, step/epoch keys, batch_size weighting, reducers, torchmetrics, dataloader
suffixes, callback_metrics/logged_metrics, log_every_n_steps, and no host syncs on non-logging steps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from callbacks import Callback
from framework import TrainModule
from framework.loggers import Logger

torchmetrics = pytest.importorskip("torchmetrics")


class RecordingLogger(Logger):
    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.records.append((step, dict(metrics)))


def ranged_loader(start: float = 0.0, n: int = 10, batch_size: int = 4) -> DataLoader:
    """x = start, start+1, ..., one value per sample: batch statistics are easy to compute by hand."""
    x = torch.arange(n, dtype=torch.float32) + start
    return DataLoader(TensorDataset(x), batch_size=batch_size)


class Stats(TrainModule):
    """Logs statistics of its input batches in every way self.log offers."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.mean_metric = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.log("x_mean", x.mean())
        self.log("x_both", x.mean(), on_epoch=True)
        self.log("x_epoch_only", x.mean(), on_step=False, on_epoch=True, batch_size=len(x))
        return (self.w * x).mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        (x,) = batch
        self.log("mean", x.mean())  # default: epoch mean weighted by the batch size inferred from the batch
        self.log("weighted", x.mean(), batch_size=len(x))
        self.log("total", x.sum(), reduce_fx="sum")
        self.log("largest", x.max(), reduce_fx="max")
        self.log("smallest", x.min(), reduce_fx="min")
        self.log("count", 1)  # a plain number
        self.mean_metric.update(x)
        self.log("metric", self.mean_metric)

    test_step = validation_step

    def on_validation_epoch_end(self):
        self.log("from_hook", 7.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def expected_eval(start: float, n: int = 10, batch_size: int = 4) -> dict[str, float]:
    x = torch.arange(n, dtype=torch.float64) + start
    return {
        "mean": float(x.mean()),  # Lightning infers each batch's size: the same as the explicit batch_size
        "weighted": float(x.mean()),
        "total": float(x.sum()),
        "largest": float(x.max()),
        "smallest": float(x.min()),
        "count": 1.0,
        "metric": float(x.mean()),  # MeanMetric weights every element
    }


def test_validate_returns_hand_computed_epoch_values(make_trainer):
    results = make_trainer().validate(Stats(), ranged_loader())
    assert len(results) == 1
    assert results[0] == pytest.approx({**expected_eval(0.0), "from_hook": 7.0})
    assert all(isinstance(v, float) for v in results[0].values())


def test_test_returns_hand_computed_epoch_values(make_trainer):
    [result] = make_trainer().test(Stats(), ranged_loader(5.0, n=7, batch_size=3))
    assert result == pytest.approx(expected_eval(5.0, n=7, batch_size=3))


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=17), batch_size=st.integers(1, 6))
def test_epoch_means_match_a_hand_computation(tmp_path_factory, values, batch_size):
    from framework import Trainer

    x = torch.tensor(values, dtype=torch.float32)
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path_factory.mktemp("h")))
    [result] = trainer.validate(Stats(), DataLoader(TensorDataset(x), batch_size=batch_size))
    assert result["weighted"] == pytest.approx(float(x.double().mean()), rel=1e-5, abs=1e-3)
    assert result["mean"] == pytest.approx(float(x.double().mean()), rel=1e-5, abs=1e-3)  # inferred batch sizes
    assert result["total"] == pytest.approx(float(x.double().sum()), rel=1e-5, abs=1e-2)
    assert (result["largest"], result["smallest"]) == (max(values), min(values))


def test_multiple_dataloaders_get_suffixes(make_trainer):
    results = make_trainer().validate(Stats(), [ranged_loader(), ranged_loader(100.0, n=6, batch_size=5)])
    assert len(results) == 2
    for idx, expected in enumerate([expected_eval(0.0), expected_eval(100.0, n=6, batch_size=5)]):
        suffixed = {f"{k}/dataloader_idx_{idx}": v for k, v in expected.items()}
        if idx == 1:  # one Metric object shared by both loaders is reset when the stage ends, as in Lightning
            suffixed["metric/dataloader_idx_1"] = (45.0 + 615.0) / 16
        assert results[idx] == pytest.approx({**suffixed, "from_hook": 7.0})


def test_torchmetric_is_reset_after_each_epoch(make_trainer):
    module = Stats()
    trainer = make_trainer()
    first = trainer.validate(module, ranged_loader())[0]["metric"]
    second = trainer.validate(module, ranged_loader(50.0))[0]["metric"]
    assert (first, second) == pytest.approx((4.5, 54.5))  # not (4.5, 29.5): state did not carry over
    assert module.mean_metric.update_count == 0


def test_training_defaults_and_step_epoch_keys(make_trainer):
    logger = RecordingLogger()
    trainer = make_trainer(max_epochs=1, logger=logger, log_every_n_steps=1)
    trainer.fit(Stats(), ranged_loader())  # batches [0..3] [4..7] [8, 9]
    metrics = trainer.callback_metrics
    assert metrics["x_mean"] == pytest.approx(8.5)  # last step's value
    assert "x_mean_epoch" not in metrics and "x_mean_step" not in metrics
    assert metrics["x_both_step"] == pytest.approx(8.5)
    assert metrics["x_both_epoch"] == pytest.approx((1.5 * 4 + 5.5 * 4 + 8.5 * 2) / 10)  # weighted by batch size
    assert metrics["x_both"] == metrics["x_both_epoch"]  # the bare name follows the epoch value after the epoch
    assert metrics["x_epoch_only"] == pytest.approx(4.5)
    steps = [(step, m) for step, m in logger.records if "x_mean" in m]
    assert [step for step, _ in steps] == [1, 2, 3]
    assert [m["x_mean"] for _, m in steps] == pytest.approx([1.5, 5.5, 8.5])
    assert all("x_both_step" in m and "x_both_epoch" not in m for _, m in steps)
    epoch_rows = [m for _, m in logger.records if "x_both_epoch" in m]
    assert epoch_rows == [pytest.approx({"x_both_epoch": 4.5, "x_epoch_only": 4.5, "epoch": 0.0})]


def test_logged_metrics_is_what_the_loggers_received(make_trainer):
    logger = RecordingLogger()
    trainer = make_trainer(logger=logger, log_every_n_steps=1)
    trainer.fit(Stats(), ranged_loader(), ranged_loader())
    received = {}
    for _, metrics in logger.records:
        received.update(metrics)
    received.pop("epoch")
    assert set(trainer.logged_metrics) == set(received)
    assert {k: float(v) for k, v in trainer.logged_metrics.items()} == pytest.approx(received)
    assert trainer.logged_metrics["mean"] == pytest.approx(expected_eval(0.0)["mean"])


def test_logged_metrics_without_a_logger(make_trainer):
    """As in Lightning, logged_metrics fills on logging steps and epoch ends even when no logger is attached."""
    trainer = make_trainer(logger=False, log_every_n_steps=2)
    trainer.fit(Stats(), ranged_loader(), ranged_loader())  # 3 steps: the step-2 values are the last logged
    assert trainer.logged_metrics["x_mean"] == pytest.approx(5.5)
    assert trainer.logged_metrics["x_both_epoch"] == pytest.approx(4.5)
    assert trainer.logged_metrics["weighted"] == pytest.approx(4.5)


def test_callback_metrics_visible_to_callbacks(make_trainer):
    seen = {}

    class Peek(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.setdefault("batch", dict(trainer.callback_metrics))

        def on_validation_end(self, trainer, module):
            seen["validation"] = dict(trainer.callback_metrics)

    make_trainer(callbacks=[Peek()]).fit(Stats(), ranged_loader(), ranged_loader())
    assert seen["batch"]["x_mean"] == pytest.approx(1.5)
    assert seen["validation"]["weighted"] == pytest.approx(4.5)
    assert seen["validation"]["x_mean"] == pytest.approx(8.5)  # training values stay visible during validation


def test_bare_name_follows_the_newest_value(make_trainer):
    seen = []

    class Peek(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append((trainer.current_epoch, float(trainer.callback_metrics["x_both"])))

    make_trainer(max_epochs=2, callbacks=[Peek()]).fit(Stats(), ranged_loader())
    # in epoch 1 the bare name is the latest step value again, not epoch 0's mean (31/6)
    assert [epoch for epoch, _ in seen] == [0, 0, 0, 1, 1, 1]
    assert [value for _, value in seen] == pytest.approx([1.5, 5.5, 8.5] * 2)


@pytest.mark.parametrize("every", [1, 2, 4, 50])
def test_log_every_n_steps(make_trainer, every):
    logger = RecordingLogger()
    trainer = make_trainer(max_epochs=2, logger=logger, log_every_n_steps=every)
    trainer.fit(Stats(), ranged_loader(n=20))  # 5 steps per epoch
    step_rows = [step for step, m in logger.records if "x_mean" in m]
    assert step_rows == [s for s in range(1, 11) if s % every == 0]


def test_step_metrics_of_torchmetric_use_forward_value(make_trainer):
    class M(Stats):
        def training_step(self, batch, batch_idx):
            (x,) = batch
            self.mean_metric(x)  # forward: batch value cached, state accumulated
            self.log("tm", self.mean_metric, on_step=True, on_epoch=True)
            return (self.w * x).mean()

    trainer = make_trainer(max_epochs=1)
    module = M()
    trainer.fit(module, ranged_loader())
    assert trainer.callback_metrics["tm_step"] == pytest.approx(8.5)
    assert trainer.callback_metrics["tm_epoch"] == pytest.approx(4.5)
    assert module.mean_metric.update_count == 0


def test_step_only_torchmetric_is_reset_at_epoch_end(make_trainer):
    class M(Stats):
        def training_step(self, batch, batch_idx):
            (x,) = batch
            self.log("tm", self.mean_metric(x))  # logs the forward value tensor
            self.log("tm_obj", self.mean_metric)  # and the Metric object, step only
            return (self.w * x).mean()

    module = M()
    make_trainer(max_epochs=2).fit(module, ranged_loader())
    assert module.mean_metric.update_count == 0  # otherwise its state grows across epochs forever


def test_one_torchmetric_under_two_names_is_computed_before_reset(make_trainer):
    class M(Stats):
        def validation_step(self, batch, batch_idx):
            self.mean_metric.update(batch[0])
            self.log("first", self.mean_metric)
            self.log("second", self.mean_metric)

    [result] = make_trainer().validate(M(), ranged_loader())
    assert (result["first"], result["second"]) == pytest.approx((4.5, 4.5))


# ---- bad input to self.log ------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "kwargs", "words"), [
    (torch.ones(3), {}, ["'bad'", "shape (3,)", "single element"]),
    ("high", {}, ["'bad'", "value='high'", "a str cannot be logged"]),
    (None, {}, ["value=None"]),
    ({"a": 1.0}, {}, ["'bad'", "log_dict"]),
    ({"a": {"b": 1.0}}, {}, ["nested dictionaries"]),
    (1.0, {"on_step": False, "on_epoch": False}, ["would log nothing"]),
    (1.0, {"reduce_fx": "median"}, ["reduce_fx='median'", "'mean'", "torchmetrics.Metric"]),
    (1.0, {"reduce_fx": torch.median}, ["reduce_fx=<built-in method median"]),
])
def test_bad_log_calls(make_trainer, value, kwargs, words):
    class M(Stats):
        def validation_step(self, batch, batch_idx):
            self.log("bad", value, **kwargs)

    with pytest.raises(ValueError) as info:
        make_trainer().validate(M(), ranged_loader())
    for word in words:
        assert word in str(info.value)


def test_log_outside_a_run_warns_and_drops_the_value():
    """As in Lightning: a step method can be unit-tested without a Trainer."""
    with pytest.warns(UserWarning, match="not attached to a Trainer"):
        Stats().log("x", 1.0)


def test_log_dict_passes_options(make_trainer):
    class M(Stats):
        def validation_step(self, batch, batch_idx):
            (x,) = batch
            self.log_dict({"a": x.sum(), "b": x.max()}, reduce_fx="sum")

    assert make_trainer().validate(M(), ranged_loader()) == [pytest.approx({"a": 45.0, "b": 3 + 7 + 9,
                                                                            "from_hook": 7.0})]


def test_prog_bar_metrics(make_trainer):
    class M(Stats):
        def training_step(self, batch, batch_idx):
            self.log("shown", 1.0, prog_bar=True, on_epoch=True)
            self.log("hidden", 2.0)
            return super().training_step(batch, batch_idx)

    trainer = make_trainer()
    trainer.fit(M(), ranged_loader())
    # Lightning's progress bar shows the forked names only (the step value, then the epoch value)
    assert set(trainer.progress_bar_metrics) == {"shown_step", "shown_epoch"}


# ---- no host synchronisation per step -----------------------------------------------------------------------
SYNCING = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy")


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts calls of Tensor methods that copy a value to the host."""
    counter = {"n": 0}
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counter


class SyncsPerBatch(Callback):
    def __init__(self, counter):
        self.counter, self.at_start, self.at_val_start = counter, [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.at_start.append(self.counter["n"])

    def on_validation_batch_start(self, trainer, module, batch, batch_idx):
        self.at_val_start.append(self.counter["n"])


@pytest.mark.parametrize(("logger", "every", "expected_logging_batches"), [
    (False, 1, []), (True, 3, [2, 5, 8])])
def test_no_host_sync_on_steps_without_logger_writes(make_trainer, make_loader, tiny_module_cls, sync_counter,
                                                     logger, every, expected_logging_batches):
    probe = SyncsPerBatch(sync_counter)
    trainer = make_trainer(max_epochs=1, callbacks=[probe], logger=RecordingLogger() if logger else False,
                           log_every_n_steps=every, gradient_clip_val=1.0)
    trainer.fit(tiny_module_cls(), make_loader(44, batch_size=4))  # 11 batches, loss logged every step
    syncs = [b - a for a, b in zip(probe.at_start, probe.at_start[1:])]  # syncs during batch i (i < 10)
    assert [i for i, n in enumerate(syncs) if n] == expected_logging_batches


# ---- logging from epoch hooks ---------------------------------------------------------------------------------
class EpochHookLogging(Stats):
    """Logs from on_train_epoch_start/end with defaults (epoch-level there, as in Lightning) and explicitly."""

    def on_train_epoch_start(self):
        self.log("start_value", float(self.current_epoch))

    def on_train_epoch_end(self):
        self.log("end_value", 10.0 + self.current_epoch)
        self.log("end_explicit", 20.0 + self.current_epoch, on_step=False, on_epoch=True)


def test_epoch_hook_logs_are_epoch_values_seen_by_callbacks_and_loggers(make_trainer):
    seen = []

    class Monitor(Callback):
        """Lightning runs a plain callback's on_train_epoch_end before the module's, so it reads the module's
        epoch-end values when the next epoch starts (and at the end of training)."""

        def record(self, trainer):
            m = trainer.callback_metrics
            seen.append((float(m["start_value"]), float(m["end_value"]), float(m["end_explicit"])))

        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch:
                self.record(trainer)

        def on_train_end(self, trainer, module):
            self.record(trainer)

    logger = RecordingLogger()
    trainer = make_trainer(max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[Monitor()])
    trainer.fit(EpochHookLogging(), ranged_loader())  # 3 steps per epoch
    assert seen == [(0.0, 10.0, 20.0), (1.0, 11.0, 21.0)]
    rows = [(step, m) for step, m in logger.records if "end_value" in m]
    assert [step for step, _ in rows] == [3, 6]  # written once per epoch, at the epoch's last step
    assert [(m["start_value"], m["end_value"], m["end_explicit"]) for _, m in rows] == [(0, 10, 20), (1, 11, 21)]
    assert not any("end_value" in m for step, m in logger.records if "x_mean" in m)  # not a step metric


def test_callback_logging_in_on_train_epoch_end_reaches_loggers(make_trainer):
    class LogFromCallback(Callback):
        def on_train_epoch_end(self, trainer, module):
            module.log("from_callback", 3.0 + trainer.current_epoch)

    logger = RecordingLogger()
    trainer = make_trainer(max_epochs=2, logger=logger, callbacks=[LogFromCallback()])
    trainer.fit(Stats(), ranged_loader())
    assert [(step, m["from_callback"]) for step, m in logger.records if "from_callback" in m] == [(3, 3.0), (6, 4.0)]
    assert trainer.callback_metrics["from_callback"] == 4.0


def test_plateau_scheduler_reads_a_metric_logged_in_on_train_epoch_end(make_trainer):
    class M(EpochHookLogging):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "end_value"}}

    trainer = make_trainer(max_epochs=2)
    trainer.fit(M(), ranged_loader())
    assert trainer.optimizers[0].param_groups[0]["lr"] == 1.0  # end_value improved every epoch


def test_no_host_sync_per_validation_step(make_trainer, make_loader, tiny_module_cls, sync_counter):
    probe = SyncsPerBatch(sync_counter)
    trainer = make_trainer(callbacks=[probe])
    trainer.validate(tiny_module_cls(), make_loader(40, batch_size=4))  # val_loss logged every step
    assert len(set(probe.at_val_start)) == 1 and len(probe.at_val_start) == 10


def test_a_logged_metric_must_be_an_attribute_of_the_module(make_trainer):
    from framework.exceptions import MisconfigurationException

    class Stray(Stats):
        def validation_step(self, batch, batch_idx):
            stray = torchmetrics.MeanMetric()  # not held by the module: its state could not be checkpointed
            stray.update(batch[0])
            self.log("stray", stray)

    with pytest.raises(MisconfigurationException, match="'stray'.*not an attribute of Stray.*mean_metric"):
        make_trainer().validate(Stray(), ranged_loader())


def test_evaluation_step_values_reach_the_loggers_and_predict_refuses_logging(make_trainer):
    class StepLogs(Stats):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self.log("val_step_value", float(batch_idx), on_step=True, on_epoch=False)

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            self.log("nope", 1.0)

    logger = RecordingLogger()
    make_trainer(logger=logger).validate(StepLogs(), ranged_loader(), verbose=False)  # 3 batches
    rows = [(step, m["val_step_value"]) for step, m in logger.records if "val_step_value" in m]
    assert rows == [(0, 0.0), (1, 1.0), (2, 2.0)]
    with pytest.raises(ValueError, match="predict_step"):
        make_trainer().predict(StepLogs(), ranged_loader())
