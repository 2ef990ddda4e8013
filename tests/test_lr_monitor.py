"""LearningRateMonitor: names, cadence per interval, momentum, weight decay, param groups, no-logger refusal."""

from __future__ import annotations

import csv
import os
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.lr_monitor import LearningRateMonitor
from framework import Trainer, TrainModule
from framework.loggers import CSVLogger, Logger
from framework.optim import LRSchedulerConfig


class RecordingLogger(Logger):
    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.records.append((step, dict(metrics)))


def params(n=1):
    return [torch.nn.Parameter(torch.zeros(2)) for _ in range(n)]


def make_trainer(optimizers, configs=(), log_every_n_steps=1, loggers=None):
    return SimpleNamespace(
        optimizers=list(optimizers),
        lr_scheduler_configs=list(configs),
        loggers=[RecordingLogger()] if loggers is None else loggers,
        log_every_n_steps=log_every_n_steps,
        global_step=0,
        current_epoch=0,
    )


def fit(callback, trainer, epochs, steps_per_epoch, accumulate=1):
    """Drive the hooks the way the Trainer does, stepping optimizers and schedulers for real."""
    callback.on_train_start(trainer, None)
    for epoch in range(epochs):
        trainer.current_epoch = epoch
        callback.on_train_epoch_start(trainer, None)
        for batch_idx in range(steps_per_epoch * accumulate):
            callback.on_train_batch_start(trainer, None, None, batch_idx)
            if (batch_idx + 1) % accumulate == 0:
                for opt in trainer.optimizers:
                    opt.step()
                for config in trainer.lr_scheduler_configs:
                    if config.interval == "step":
                        config.scheduler.step()
                trainer.global_step += 1
        for config in trainer.lr_scheduler_configs:
            if config.interval == "epoch":
                config.scheduler.step()


def test_step_scheduler_logged_on_logging_steps():
    opt = torch.optim.SGD(params(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = make_trainer([opt], [LRSchedulerConfig(sched, interval="step")], log_every_n_steps=2)
    fit(LearningRateMonitor(), trainer, epochs=1, steps_per_epoch=6)
    # Logged before the step runs, at steps 1, 3, 5: lr = 0.5 ** step.
    assert trainer.loggers[0].records == [
        (1, {"lr-SGD": 0.5}),
        (3, {"lr-SGD": 0.125}),
        (5, {"lr-SGD": 0.03125}),
    ]


def test_accumulation_logs_each_step_once():
    opt = torch.optim.SGD(params(), lr=0.1)
    trainer = make_trainer([opt], log_every_n_steps=1)
    fit(LearningRateMonitor(logging_interval="step"), trainer, epochs=1, steps_per_epoch=3, accumulate=4)
    assert [step for step, _ in trainer.loggers[0].records] == [0, 1, 2]


def test_epoch_scheduler_logged_at_epoch_start():
    opt = torch.optim.Adam(params(), lr=1.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1)
    trainer = make_trainer([opt], [LRSchedulerConfig(sched, interval="epoch")])
    fit(LearningRateMonitor(), trainer, epochs=3, steps_per_epoch=2)
    records = trainer.loggers[0].records
    assert [step for step, _ in records] == [0, 2, 4]
    assert [m["lr-Adam"] for _, m in records] == pytest.approx([1.0, 0.1, 0.01])


@pytest.mark.parametrize(("interval", "steps"), [("step", [0, 1, 2, 3]), ("epoch", [0, 2])])
def test_forced_interval_logs_every_scheduler(interval, steps):
    opt = torch.optim.SGD(params(), lr=1.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    trainer = make_trainer([opt], [LRSchedulerConfig(sched, interval="epoch")])
    fit(LearningRateMonitor(logging_interval=interval), trainer, epochs=2, steps_per_epoch=2)
    assert [step for step, _ in trainer.loggers[0].records] == steps


def test_names_for_several_optimizers_and_groups():
    sgd_a = torch.optim.SGD(params(), lr=0.1)
    sgd_b = torch.optim.SGD([{"params": params()}, {"params": params(), "lr": 0.2}], lr=0.3)
    adam = torch.optim.Adam([{"params": params(), "name": "encoder"}, {"params": params(), "name": "head"}])
    named = torch.optim.SGD(params(), lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(named, step_size=1)
    trainer = make_trainer([sgd_a, sgd_b, adam, named], [LRSchedulerConfig(sched, name="backbone-lr")])
    stats = LearningRateMonitor().current_stats(trainer)
    assert stats == {
        "lr-SGD": 0.1,
        "lr-SGD-1/pg1": 0.3,
        "lr-SGD-1/pg2": 0.2,
        "lr-Adam/encoder": 0.001,
        "lr-Adam/head": 0.001,
        "backbone-lr": 0.4,
    }


def test_duplicate_param_group_names_are_refused():
    opt = torch.optim.SGD([{"params": params(), "name": "x"}, {"params": params(), "name": "x"}], lr=0.1)
    with pytest.raises(ValueError, match="duplicate names"):
        LearningRateMonitor().current_stats(make_trainer([opt]))


@pytest.mark.parametrize(
    ("optimizer", "momentum"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 0.9),
        (lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.99)), 0.8),
        (lambda p: torch.optim.Adagrad(p, lr=0.1), 0.0),
    ],
)
def test_momentum(optimizer, momentum):
    opt = optimizer(params())
    stats = LearningRateMonitor(log_momentum=True).current_stats(make_trainer([opt]))
    name = f"lr-{type(opt).__name__}"
    assert stats == {name: pytest.approx(0.1), f"{name}-momentum": pytest.approx(momentum)}


def test_tensor_lr_is_logged_as_float():
    opt = torch.optim.Adam(params(), lr=torch.tensor(0.01))
    stats = LearningRateMonitor().current_stats(make_trainer([opt]))
    assert type(stats["lr-Adam"]) is float and stats["lr-Adam"] == pytest.approx(0.01)


def test_without_loggers_is_refused():  # as Lightning: the callback would record nothing
    trainer = make_trainer([torch.optim.SGD(params(), lr=0.1)], loggers=[])
    with pytest.raises(ValueError, match="no logger"):
        fit(LearningRateMonitor(), trainer, epochs=1, steps_per_epoch=2)


def test_weight_decay_history_and_named_single_group():
    sgd = torch.optim.SGD([{"params": params(), "name": "body"}], lr=0.1, weight_decay=0.01)
    adam = torch.optim.Adam(params(), lr=0.2)
    trainer = make_trainer([sgd, adam])
    callback = LearningRateMonitor(log_weight_decay=True)
    fit(callback, trainer, epochs=1, steps_per_epoch=2)
    assert callback.lrs == {"lr-SGD/body": [0.1, 0.1, 0.1], "lr-Adam": [0.2, 0.2, 0.2]}
    assert callback.last_weight_decay_values == {"lr-SGD/body-weight_decay": 0.01, "lr-Adam-weight_decay": 0.0}
    step, logged = trainer.loggers[0].records[-1]
    assert logged == {"lr-SGD/body": 0.1, "lr-SGD/body-weight_decay": 0.01, "lr-Adam": 0.2,
                      "lr-Adam-weight_decay": 0.0}


def test_momentum_missing_warns():
    trainer = make_trainer([torch.optim.Adagrad(params(), lr=0.1)])
    with pytest.warns(RuntimeWarning, match="no momentum"):
        LearningRateMonitor(log_momentum=True).on_train_start(trainer, None)


@pytest.mark.parametrize(
    ("kwargs", "error"), [({"logging_interval": "batch"}, ValueError), ({"log_momentum": "yes"}, TypeError),
                          ({"log_weight_decay": 1}, TypeError)]
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        LearningRateMonitor(**kwargs)


# ---- end to end with a real Trainer ----------------------------------------------------------------


class Scheduled(TrainModule):
    def __init__(self, interval):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.interval = interval

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0, momentum=0.5)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        ("step", {0: 1.0, 1: 0.5, 2: 0.25, 3: 0.125, 4: 0.0625, 5: 0.03125}),
        ("epoch", {0: 1.0, 3: 0.5}),
    ],
)
def test_fit_logs_learning_rates_to_csv(tmp_path, interval, expected):
    logger = CSVLogger(tmp_path)
    trainer = Trainer(
        max_epochs=2,
        callbacks=[LearningRateMonitor(log_momentum=True)],
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Scheduled(interval), DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=4))
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["lr-SGD"]]
    assert {int(r["step"]): float(r["lr-SGD"]) for r in rows} == expected
    assert {float(r["lr-SGD-momentum"]) for r in rows} == {0.5}


def test_fit_without_logger_is_refused():
    trainer = Trainer(
        max_epochs=1,
        callbacks=[LearningRateMonitor()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(ValueError, match="LearningRateMonitor callback with a Trainer that has no logger"):
        trainer.fit(Scheduled("step"), DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4))
