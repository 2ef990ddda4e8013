"""Trainer run control: epoch/step limits, batch limits, validation cadence, should_stop, entry points' results,
data errors, train/eval modes, and an fsspec default_root_dir."""

from __future__ import annotations

import csv
import io
import math
import uuid

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from callbacks import Callback
from framework import Trainer
from framework.loggers import CSVLogger


class CountValidations(Callback):
    """Records ``(epoch, batches done in the epoch)`` at each validation start."""

    def __init__(self):
        self.at = []

    def on_validation_start(self, trainer, module):
        self.at.append((trainer.current_epoch, trainer.fit_loop.batches_done))


# ---- max_epochs / max_steps ------------------------------------------------------------------------------
@pytest.mark.parametrize(("max_epochs", "max_steps", "steps", "epoch"), [
    (2, -1, 10, 2),  # epochs first
    (3, 7, 7, 2),  # steps first, mid-epoch: the cut epoch counts (Lightning's current_epoch)
    (2, 10, 10, 2),  # both at once
    (None, 12, 12, 3),  # steps only
    (-1, 3, 3, 1),  # -1: no epoch limit
    (0, -1, 0, 0),
    (3, 0, 0, 0),
])
def test_epoch_and_step_limits(make_trainer, tiny_module_cls, make_loader, max_epochs, max_steps, steps, epoch):
    trainer = make_trainer(max_epochs=max_epochs, max_steps=max_steps)
    trainer.fit(tiny_module_cls(), make_loader(20, batch_size=4))  # 5 batches per epoch
    assert (trainer.global_step, trainer.current_epoch) == (steps, epoch)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_epochs=st.integers(1, 3), max_steps=st.integers(-1, 12), batches=st.integers(1, 6),
       accumulate=st.integers(1, 3))
def test_whichever_limit_comes_first(make_trainer, tiny_module_cls, make_loader, max_epochs, max_steps, batches,
                                     accumulate):
    trainer = make_trainer(max_epochs=max_epochs, max_steps=max_steps, accumulate_grad_batches=accumulate)
    trainer.fit(tiny_module_cls(), make_loader(batches * 2, batch_size=2))
    per_epoch = math.ceil(batches / accumulate)  # the short tail window steps too
    by_epochs = max_epochs * per_epoch
    assert trainer.global_step == (by_epochs if max_steps < 0 else min(by_epochs, max_steps))
    # Lightning's current_epoch: an epoch that max_steps cut short counts as done
    by_steps = max_epochs if max_steps < 0 or max_steps >= by_epochs else math.ceil(max_steps / per_epoch)
    assert trainer.current_epoch == by_steps


def test_default_is_1000_epochs_with_a_warning(tmp_path, tiny_module_cls, make_loader):
    with pytest.warns(UserWarning, match="Neither max_epochs nor max_steps was set"):
        trainer = Trainer(default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                          enable_progress_bar=False)
    trainer.fit(tiny_module_cls(), make_loader(4, batch_size=4))
    assert (trainer.current_epoch, trainer.global_step) == (1000, 1000)


def test_fit_again_continues_from_where_it_stopped(make_trainer, tiny_module_cls, make_loader):
    module, loader = tiny_module_cls(), make_loader(8, batch_size=4)
    trainer = make_trainer(max_epochs=None, max_steps=3)
    trainer.fit(module, loader)
    trainer.max_steps = 5
    trainer.fit(module, loader)
    assert trainer.global_step == 5


# ---- batch limits ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("limit", "expected"), [(None, 10), (3, 3), (50, 10), (0.5, 5), (0.25, 2), (1.0, 10)])
def test_limit_train_batches(make_trainer, tiny_module_cls, make_loader, limit, expected):
    trainer = make_trainer(max_epochs=2, limit_train_batches=limit)
    trainer.fit(tiny_module_cls(), make_loader(40, batch_size=4))
    assert trainer.num_training_batches == expected and trainer.global_step == 2 * expected


@pytest.mark.parametrize(("limit", "expected"), [(None, 5), (2, 2), (0.4, 2), (0.0, 0), (0, 0)])
def test_limit_val_batches(make_trainer, tiny_module_cls, make_loader, limit, expected):
    steps = []

    class M(tiny_module_cls):
        def validation_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().validation_step(batch, batch_idx)

    trainer = make_trainer(limit_val_batches=limit)
    trainer.fit(M(), make_loader(8), make_loader(20, batch_size=4))
    assert steps == list(range(expected))
    assert ("val_loss" in trainer.callback_metrics) == bool(expected)


@pytest.mark.parametrize(("argument", "stage"), [("limit_test_batches", "test"), ("limit_predict_batches", "predict")])
def test_limit_test_and_predict_batches(make_trainer, tiny_module_cls, make_loader, argument, stage):
    trainer = make_trainer(**{argument: 2})
    result = getattr(trainer, stage)(tiny_module_cls(), make_loader(20, batch_size=4))
    if stage == "predict":
        assert len(result) == 2


def test_fraction_that_selects_no_batch_is_refused(make_trainer, tiny_module_cls, make_loader):
    with pytest.raises(ValueError, match=r"limit_train_batches=0\.1 of 5 batches gives 0 batches"):
        make_trainer(limit_train_batches=0.1).fit(tiny_module_cls(), make_loader(20, batch_size=4))


# ---- validation cadence -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("interval", "expected_batches"), [
    (None, [10]), (1.0, [10]), (3, [3, 6, 9]), (5, [5, 10]), (0.5, [5, 10]), (0.25, [2, 4, 6, 8, 10]), (10, [10])])
def test_val_check_interval(make_trainer, tiny_module_cls, make_loader, interval, expected_batches):
    counter = CountValidations()
    trainer = make_trainer(max_epochs=2, val_check_interval=interval, callbacks=[counter])
    trainer.fit(tiny_module_cls(), make_loader(40, batch_size=4), make_loader(8))  # 10 batches per epoch
    assert counter.at == [(epoch, b) for epoch in (0, 1) for b in expected_batches]


def test_val_check_interval_beyond_the_epoch_is_refused(make_trainer, tiny_module_cls, make_loader):
    with pytest.raises(ValueError, match="val_check_interval=11 is more than the 10 training batches"):
        make_trainer(val_check_interval=11).fit(tiny_module_cls(), make_loader(40, batch_size=4), make_loader())


@pytest.mark.parametrize(("every", "expected_epochs"), [(1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2]), (None, [])])
def test_check_val_every_n_epoch(make_trainer, tiny_module_cls, make_loader, every, expected_epochs):
    counter = CountValidations()
    trainer = make_trainer(max_epochs=4, check_val_every_n_epoch=every, callbacks=[counter])
    trainer.fit(tiny_module_cls(), make_loader(8), make_loader(8))
    assert [epoch for epoch, _ in counter.at] == expected_epochs


def test_no_validation_without_validation_step(make_trainer, tiny_module_cls, make_loader):
    from framework import TrainModule

    class NoVal(tiny_module_cls):
        validation_step = TrainModule.validation_step

    counter = CountValidations()
    with pytest.warns(UserWarning, match="got validation data but NoVal defines no validation_step"):
        make_trainer(callbacks=[counter]).fit(NoVal(), make_loader(), make_loader())
    assert counter.at == []


# ---- should_stop ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("hook", "steps", "epoch"), [
    ("on_train_batch_end", 3, 1),  # stops after the current batch; the cut epoch counts, as in Lightning
    ("on_train_epoch_end", 5, 1),  # finishes the epoch, starts no other
    ("on_validation_end", 5, 1),
])
def test_should_stop_from_a_callback_stops_cleanly(make_trainer, tiny_module_cls, make_loader, hook, steps, epoch):
    ends = []

    class Stop(Callback):
        def on_fit_end(self, trainer, module):
            ends.append("fit_end")

        def teardown(self, trainer, module, stage):
            ends.append("teardown")

    def stop(self, trainer, module, *args):
        if hook != "on_train_batch_end" or args[-1] == 2:
            trainer.should_stop = True

    setattr(Stop, hook, stop)
    trainer = make_trainer(max_epochs=5, callbacks=[Stop()])
    trainer.fit(tiny_module_cls(), make_loader(20, batch_size=4), make_loader(8))
    assert (trainer.global_step, trainer.current_epoch) == (steps, epoch)
    assert ends == ["fit_end", "teardown"]


def test_should_stop_is_cleared_by_the_next_run(make_trainer, tiny_module_cls, make_loader):
    class StopFirst(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step == 1

    trainer = make_trainer(max_epochs=1, callbacks=[StopFirst()])
    module = tiny_module_cls()
    trainer.fit(module, make_loader())
    assert trainer.should_stop and trainer.global_step == 1
    assert trainer.validate(module, make_loader()) and not trainer.should_stop


# ---- entry points' results -----------------------------------------------------------------------------------
def test_validate_and_test_default_to_the_fitted_module(make_trainer, tiny_module_cls, make_loader):
    module = tiny_module_cls()
    trainer = make_trainer()
    trainer.fit(module, make_loader())
    loader = make_loader(8, batch_size=8)
    x, y = next(iter(loader))
    expected = torch.nn.functional.mse_loss(module(x), y).item()
    assert trainer.validate(dataloaders=loader) == [pytest.approx({"val_loss": expected})]
    assert trainer.test(dataloaders=loader) == [pytest.approx({"test_loss": expected})]


def test_predict_returns_per_batch_outputs(make_trainer, tiny_module_cls, make_loader):
    module = tiny_module_cls()
    loader = make_loader(10, batch_size=4)
    outputs = make_trainer().predict(module, loader)
    assert [len(o) for o in outputs] == [4, 4, 2]
    with torch.no_grad():
        for out, (x, _) in zip(outputs, loader):
            torch.testing.assert_close(out, module(x))
    assert not outputs[0].requires_grad


def test_predict_default_step_and_several_loaders(make_trainer, tiny_module_cls):
    from framework import TrainModule

    class Plain(tiny_module_cls):
        predict_step = TrainModule.predict_step  # self(batch)

    module = Plain()
    loaders = [DataLoader(torch.randn(6, 4), batch_size=3), DataLoader(torch.randn(2, 4), batch_size=2)]
    outputs = make_trainer().predict(module, loaders)
    assert [[tuple(o.shape) for o in per_loader] for per_loader in outputs] == [[(3, 1), (3, 1)], [(2, 1)]]


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_several_loaders_need_a_dataloader_idx_argument(make_trainer, tiny_module_cls, make_loader, stage):
    name = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}[stage]
    with pytest.raises(TypeError, match=rf"TinyModule.{name}\(\) got 2 dataloaders but takes no dataloader_idx; "
                                        rf"define {name}\(self, batch, batch_idx, dataloader_idx=0\)"):
        getattr(make_trainer(), stage)(tiny_module_cls(), [make_loader(), make_loader()])


def test_train_and_eval_modes(make_trainer, tiny_module_cls, make_loader):
    modes = []

    class M(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            modes.append(("train", self.training, torch.is_grad_enabled()))
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            modes.append(("val", self.training, torch.is_grad_enabled()))

    make_trainer(max_epochs=1, val_check_interval=2).fit(M(), make_loader(16), make_loader(4))
    assert modes == [("train", True, True)] * 2 + [("val", False, False)] + [("train", True, True)] * 2 + [
        ("val", False, False)]


def test_validation_keeps_a_frozen_submodule_in_eval(make_trainer, tiny_module_cls, make_loader):
    """Fine-tuning with a frozen BatchNorm: validation in the middle of an epoch must not unfreeze it."""
    seen = []

    class M(tiny_module_cls):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(4)

        def on_train_epoch_start(self):
            self.norm.eval()

        def training_step(self, batch, batch_idx):
            seen.append(self.norm.training)
            return super().training_step(batch, batch_idx)

    module = M()
    make_trainer(val_check_interval=2).fit(module, make_loader(16), make_loader(4))
    assert seen == [False] * 4


def test_predict_restores_the_training_mode(make_trainer, tiny_module_cls, make_loader):
    module = tiny_module_cls()
    module.train()
    make_trainer().predict(module, make_loader())
    assert module.training


@pytest.mark.parametrize(("max_epochs", "max_steps"), [(None, 3), (5, -1)])
def test_empty_training_loader_stops_with_a_warning(make_trainer, tiny_module_cls, make_loader, max_epochs, max_steps):
    trainer = make_trainer(max_epochs=max_epochs, max_steps=max_steps)
    with pytest.warns(UserWarning, match="yielded no batches in epoch 0; training stops") as record:
        trainer.fit(tiny_module_cls(), make_loader(0))  # with max_steps alone this used to loop forever
    assert record[0].filename == __file__
    assert (trainer.current_epoch, trainer.global_step) == (1, 0)


def test_limit_train_batches_zero_is_refused(make_trainer, tiny_module_cls, make_loader):
    with pytest.raises(ValueError, match="limit_train_batches=0 leaves nothing to train"):
        make_trainer(limit_train_batches=0).fit(tiny_module_cls(), make_loader())


# ---- data errors ----------------------------------------------------------------------------------------------
def test_fit_without_data(make_trainer, tiny_module_cls):
    with pytest.raises(ValueError, match=r"trainer.fit\(\) got no training data: pass train_dataloaders"):
        make_trainer().fit(tiny_module_cls())


def test_fit_with_two_training_loaders(make_trainer, tiny_module_cls, make_loader):
    with pytest.raises(ValueError, match="takes one training dataloader.*ConcatDataset"):
        make_trainer().fit(tiny_module_cls(), [make_loader(), make_loader()])


@pytest.mark.parametrize(("stage", "hook"), [("validate", "val_dataloader"), ("test", "test_dataloader"),
                                             ("predict", "predict_dataloader")])
def test_evaluation_without_data(make_trainer, tiny_module_cls, stage, hook):
    with pytest.raises(ValueError, match=rf"trainer.{stage}\(\) got no data: pass dataloaders=.*{hook}\(\)"):
        getattr(make_trainer(), stage)(tiny_module_cls())


# ---- default_root_dir on fsspec -------------------------------------------------------------------------------------
def test_memory_url_root_with_csv_logger(tiny_module_cls, make_loader):
    root = f"memory://kiln-trainer-{uuid.uuid4().hex}"
    try:
        trainer = Trainer(default_root_dir=root, max_epochs=2, log_every_n_steps=1, logger=CSVLogger(root),
                          enable_checkpointing=False, enable_progress_bar=False)
        assert trainer.default_root_dir == root
        trainer.fit(tiny_module_cls(), make_loader(8, batch_size=4), make_loader(8, batch_size=4))
        log_dir = trainer.logger.log_dir
        assert log_dir.startswith(root)
        with fsspec.open(f"{log_dir}/metrics.csv", "r") as f:
            rows = list(csv.DictReader(io.StringIO(f.read())))
        assert [int(r["step"]) for r in rows if r.get("train_loss")] == [1, 2, 3, 4]
        assert [int(r["step"]) for r in rows if r.get("val_loss")] == [2, 4]
        assert float([r for r in rows if r.get("val_loss")][-1]["val_loss"]) == pytest.approx(
            float(trainer.callback_metrics["val_loss"]))
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(root[len("memory://"):]):
            fs.rm(root[len("memory://"):], recursive=True)


def test_default_root_dir_defaults_to_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.default_root_dir == str(tmp_path)


def test_topology_attributes(make_trainer):
    trainer = make_trainer()
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.is_global_zero) == (1, 0, 0, True)
    assert trainer.precision_plugin.name == "32-true" and trainer.checkpoint_callback is None
    assert (trainer.global_step, trainer.current_epoch, trainer.skipped_steps) == (0, 0, 0)
    assert trainer.sync_gradients and not trainer.should_stop


def test_fit_after_validate_on_the_same_trainer_builds_optimizers_and_trains(tiny_module_cls, make_loader,
                                                                              make_trainer):
    module = tiny_module_cls()
    trainer = make_trainer(max_steps=3)
    trainer.validate(module, make_loader())
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, make_loader())
    assert trainer.global_step == 3 and len(trainer.optimizers) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
