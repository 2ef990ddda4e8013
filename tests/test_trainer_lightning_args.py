"""Lightning 2.x Trainer arguments that shape a run, each with Lightning's meaning (issue: Lightning parity II)."""

from __future__ import annotations

import pytest
import torch

from callbacks import Callback
from framework import Trainer
from framework.precision import Precision


class StopAt(Callback):
    """Asks to stop at the end of every training epoch (an EarlyStopping that always fires)."""

    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = True


def test_min_epochs_holds_off_a_stop(make_trainer, tiny_module_cls, make_loader):
    trainer = make_trainer(max_epochs=10, min_epochs=3, callbacks=[StopAt()])
    with pytest.warns(UserWarning, match="continues until min_epochs=3"):
        trainer.fit(tiny_module_cls(), make_loader(8))
    assert trainer.current_epoch == 3


def test_min_steps_holds_off_a_stop_inside_the_epoch(make_trainer, tiny_module_cls, make_loader):
    class StopEveryBatch(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            trainer.should_stop = True

    trainer = make_trainer(max_epochs=10, min_steps=7, callbacks=[StopEveryBatch()])
    with pytest.warns(UserWarning, match="min_steps=7"):
        trainer.fit(tiny_module_cls(), make_loader(20))  # 5 batches an epoch
    assert trainer.global_step == 7


def test_sanity_check_runs_two_batches_and_leaves_no_trace(make_trainer, tiny_module_cls, make_loader):
    seen, flags = [], []

    class M(tiny_module_cls):
        def validation_step(self, batch, batch_idx):
            seen.append((self.trainer.sanity_checking, batch_idx))
            torch.rand(3)  # draws from the global generator: must not shift training's random numbers
            self.log("val_loss", self.loss(batch))

    class Watch(Callback):
        def on_sanity_check_start(self, trainer, module):
            flags.append(("start", trainer.sanity_checking, trainer.global_step))

        def on_sanity_check_end(self, trainer, module):
            flags.append(("end", trainer.sanity_checking, sorted(trainer.callback_metrics)))

        def on_train_start(self, trainer, module):
            flags.append(("train", trainer.sanity_checking, dict(trainer.callback_metrics)))

    torch.manual_seed(0)
    trainer = make_trainer(num_sanity_val_steps=None, limit_val_batches=0.0, callbacks=[Watch()])
    trainer.fit(M(), make_loader(8), make_loader(20))
    assert seen == [] and [f[0] for f in flags] == ["train"]  # limit_val_batches=0: no validation, no sanity check
    flags.clear()

    torch.manual_seed(0)
    trainer = make_trainer(callbacks=[Watch()], num_sanity_val_steps=None, max_epochs=1)
    trainer.fit(M(), make_loader(8), make_loader(20))
    assert seen[:2] == [(True, 0), (True, 1)] and seen[2:] == [(False, i) for i in range(5)]
    # What the sanity check logged is visible at its end and gone when training starts (as in Lightning).
    assert flags == [("start", True, 0), ("end", True, ["val_loss"]), ("train", False, {})]
    after_sanity = torch.rand(1)

    torch.manual_seed(0)
    make_trainer(num_sanity_val_steps=0, max_epochs=1).fit(M(), make_loader(8), make_loader(20))
    assert torch.equal(torch.rand(1), after_sanity)  # the sanity check's draws were undone


def test_sanity_check_minus_one_runs_every_batch(make_trainer, tiny_module_cls, make_loader):
    seen = []

    class M(tiny_module_cls):
        def validation_step(self, batch, batch_idx):
            if self.trainer.sanity_checking:
                seen.append(batch_idx)

    make_trainer(num_sanity_val_steps=-1).fit(M(), make_loader(8), make_loader(20))
    assert seen == [0, 1, 2, 3, 4]


def test_fast_dev_run_runs_n_batches_of_each_stage_without_checkpoints(tmp_path, tiny_module_cls, make_loader):
    calls = []

    class M(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            calls.append(("train", batch_idx))
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            calls.append(("val", batch_idx))

    with pytest.warns(UserWarning, match="fast_dev_run=2"):
        trainer = Trainer(fast_dev_run=2, default_root_dir=str(tmp_path), enable_progress_bar=False,
                          enable_model_summary=False)
    trainer.fit(M(), make_loader(40), make_loader(40))
    assert calls == [("train", 0), ("train", 1), ("val", 0), ("val", 1)]
    assert trainer.global_step == 2 and [type(lg).__name__ for lg in trainer.loggers] == ["DummyLogger"]
    # Lightning's values under fast_dev_run (val_check_interval reads 1.0, its default, as without fast_dev_run)
    assert (trainer.max_steps, trainer.max_epochs, trainer.num_sanity_val_steps) == (2, 1, 0)
    assert (trainer.val_check_interval, trainer.check_val_every_n_epoch) == (1.0, 1)
    assert Trainer(max_epochs=1, logger=False, enable_progress_bar=False).val_check_interval == 1.0
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "lightning_logs").exists()
    assert len(trainer.predict(M(), make_loader(40))) == 2


@pytest.mark.parametrize("logger", [True, "csv", False])
def test_fast_dev_run_swaps_loggers_for_one_that_records_nothing(tmp_path, tiny_module_cls, make_loader, logger):
    """Lightning's rule: code that talks to self.logger (experiment calls included) still runs under fast_dev_run,
    and nothing is written; with logging off there is no logger, as without fast_dev_run."""
    from framework.loggers import CSVLogger

    class UsesLogger(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            self.logger.experiment.add_histogram("weights", self.layer.weight, batch_idx)
            self.logger.log_metrics({"x": 1.0}, step=batch_idx)
            self.logger[0].experiment.anything(1, key=2)
            return super().training_step(batch, batch_idx)

    given = CSVLogger(str(tmp_path / "csv")) if logger == "csv" else logger
    with pytest.warns(UserWarning, match="fast_dev_run=1"):
        trainer = Trainer(fast_dev_run=1, default_root_dir=str(tmp_path), enable_progress_bar=False,
                          enable_model_summary=False, logger=given, enable_checkpointing=False)
    if logger is False:
        assert trainer.logger is None and trainer.loggers == []
        return
    assert type(trainer.logger).__name__ == "DummyLogger" and len(trainer.loggers) == 1
    assert (trainer.logger.name, trainer.logger.version) == ("", "")
    trainer.fit(UsesLogger(), make_loader(8))
    assert trainer.global_step == 1 and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("fail_at", [None, 1])
def test_fast_dev_run_keeps_checkpoint_callbacks_that_save_nothing(tmp_path, tiny_module_cls, make_loader, fail_at):
    """Lightning's rule: fast_dev_run does not contradict a ModelCheckpoint; every save (top-k, last, on exception)
    is skipped, and trainer.checkpoint_callback exists."""
    from callbacks import ModelCheckpoint

    class M(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            if batch_idx == fail_at:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    mine = ModelCheckpoint(dirpath=tmp_path / "mine", save_last=True, save_on_exception=True, every_n_train_steps=1)
    with pytest.warns(UserWarning, match="fast_dev_run=2"):
        trainer = Trainer(fast_dev_run=2, default_root_dir=str(tmp_path), enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[mine])
    with pytest.warns(UserWarning, match="fast_dev_run=2"):
        default = Trainer(fast_dev_run=2, default_root_dir=str(tmp_path), enable_progress_bar=False)
    assert trainer.checkpoint_callback is mine and isinstance(default.checkpoint_callback, ModelCheckpoint)
    if fail_at is None:
        trainer.fit(M(), make_loader(40))
        assert trainer.global_step == 2
    else:
        with pytest.raises(RuntimeError, match="boom"):
            trainer.fit(M(), make_loader(40))
    default.fit(tiny_module_cls(), make_loader(40))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert mine.best_model_path == mine.last_model_path == ""


def test_overfit_batches_repeats_the_same_batches_in_order(make_trainer, tiny_module_cls, make_loader):
    firsts = []

    class M(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            firsts.append(batch[0][0, 0].item())
            return super().training_step(batch, batch_idx)

    with pytest.warns(UserWarning, match="read in order"):
        trainer = make_trainer(overfit_batches=2, max_epochs=3)
        trainer.fit(M(), make_loader(40, shuffle=True))
    assert len(firsts) == 6 and firsts[:2] == firsts[2:4] == firsts[4:]
    assert firsts[0] == make_loader(40).dataset[0][0][0].item()


def test_inference_mode_in_evaluation(make_trainer, tiny_module_cls, make_loader):
    modes = []

    class M(tiny_module_cls):
        def validation_step(self, batch, batch_idx):
            modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    make_trainer().validate(M(), make_loader(4), verbose=False)
    make_trainer(inference_mode=False).validate(M(), make_loader(4), verbose=False)
    assert modes == [(True, False), (False, False)]


def test_detect_anomaly_names_the_backward_that_made_nan(make_trainer, tiny_module_cls, make_loader):
    class M(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            return (self(batch[0]) * 0).sqrt().sum() * 0 + torch.sqrt(self(batch[0]) - 1e9).sum()

    with pytest.raises(RuntimeError, match="returned nan values"), pytest.warns(UserWarning):
        make_trainer(detect_anomaly=True).fit(M(), make_loader(4))


def test_reload_dataloaders_every_n_epochs(make_trainer, tiny_module_cls, make_loader):
    requested = []

    class M(tiny_module_cls):
        def train_dataloader(self):
            requested.append(self.current_epoch)
            return make_loader(8)

    make_trainer(max_epochs=4, reload_dataloaders_every_n_epochs=2).fit(M())
    assert requested == [0, 2]
    requested.clear()
    make_trainer(max_epochs=3).fit(M())
    assert requested == [0]


def test_benchmark_and_deterministic_set_torch_flags(make_trainer):
    before = torch.backends.cudnn.benchmark
    try:
        make_trainer(benchmark=True)
        assert torch.backends.cudnn.benchmark is True
        make_trainer(benchmark=False)
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_barebones_turns_features_off_and_refuses_contradictions(tmp_path, tiny_module_cls, make_loader):
    trainer = Trainer(barebones=True, max_epochs=1, default_root_dir=str(tmp_path))
    trainer.fit(tiny_module_cls(), make_loader(8), make_loader(8))
    assert trainer.loggers == [] and trainer.checkpoint_callback is None and trainer.num_sanity_val_steps == 0
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"barebones=True, enable_checkpointing=True"):
        Trainer(barebones=True, enable_checkpointing=True)
    with pytest.raises(ValueError, match=r"barebones=True, logger=True"):
        Trainer(barebones=True, logger=True)


def test_plugins_takes_a_precision_plugin_and_refuses_others(make_trainer):
    class Half(Precision):
        name = "custom"

    assert isinstance(make_trainer(plugins=[Half()]).precision_plugin, Half)
    with pytest.raises(ValueError, match="plugins=.*not supported"):
        make_trainer(plugins=["some_environment"])
    with pytest.raises(ValueError, match="Give one precision"):
        make_trainer(plugins=Half(), precision="bf16-mixed")


def test_model_registry_is_refused_by_name():
    with pytest.raises(ValueError, match="model_registry='hub:model' is not supported"):
        Trainer(model_registry="hub:model")


@pytest.mark.parametrize(("name", "value", "words"), [
    ("fast_dev_run", -1, "fast_dev_run=-1"), ("overfit_batches", 1.5, "overfit_batches=1.5"),
    ("num_sanity_val_steps", -2, "num_sanity_val_steps=-2"), ("min_epochs", -1, "min_epochs=-1"),
    ("max_time", "1:2", "max_time='1:2'"), ("reload_dataloaders_every_n_epochs", -1, "=-1"),
    ("inference_mode", "yes", "inference_mode='yes'"), ("deterministic", "always", "deterministic='always'"),
])
def test_bad_values_name_the_argument(name, value, words):
    with pytest.raises(ValueError, match=words):
        Trainer(**{name: value})


def test_max_time_forms():
    from datetime import timedelta

    from framework.arguments import max_time

    assert max_time("00:01:00:30") == 3630 and max_time({"minutes": 2}) == 120
    assert max_time(timedelta(seconds=5)) == 5 and max_time(None) is None


def test_max_time_stops_cleanly_and_the_checkpoint_resumes(tmp_path, tiny_module_cls, make_loader):
    import time

    from callbacks import ModelCheckpoint

    class Slow(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            time.sleep(0.05)
            return super().training_step(batch, batch_idx)

    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = Trainer(max_time={"seconds": 1}, max_epochs=-1, callbacks=[checkpoints], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(Slow(), make_loader(400, batch_size=4))  # 100 batches of 50 ms: the clock stops it first
    # Lightning counts the epoch the clock cut short (current_epoch 1); the resume point stays inside it
    assert trainer.should_stop and 5 <= trainer.global_step < 100 and trainer.current_epoch == 1
    resumed = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=str(tmp_path))
    resumed.fit(tiny_module_cls(), make_loader(400, batch_size=4), ckpt_path=checkpoints.last_model_path)
    assert resumed.global_step == 100  # went on from the stopping point to the end of the epoch
