"""ProgressBar: what it prints, where, how often it reads the loss, and when it stays quiet."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.progress import ProgressBar
from framework import Trainer, TrainModule


class CountingLoss:
    """Stands in for ``trainer.last_loss`` and counts host reads (``float()``), i.e. ``.item()`` calls."""

    def __init__(self, value: float) -> None:
        self.value, self.reads = value, 0

    def __float__(self) -> float:
        self.reads += 1
        return self.value


def make_trainer(num_training_batches=4, num_val_batches=(2,), rank=0):
    return SimpleNamespace(
        is_global_zero=rank == 0,
        current_epoch=0,
        global_step=0,
        num_training_batches=num_training_batches,
        num_val_batches=list(num_val_batches),
        last_loss=torch.tensor(0.5),
        progress_bar_metrics={"acc": torch.tensor(0.875)},
        stage="fit",
    )


def run_epoch(bar, trainer, batches, validate=False):
    bar.on_train_epoch_start(trainer, None)
    for i in range(batches):
        trainer.global_step += 1
        bar.on_train_batch_end(trainer, None, None, None, i)
    if validate:
        bar.on_validation_start(trainer, None)
        for i in range(2):
            bar.on_validation_batch_end(trainer, None, None, None, i)
        trainer.progress_bar_metrics = {**trainer.progress_bar_metrics, "val_loss": torch.tensor(0.25)}
        bar.on_validation_end(trainer, None)
    bar.on_train_epoch_end(trainer, None)
    trainer.current_epoch += 1


def fit(bar, trainer, epochs=1, batches=4, validate=False):
    bar.setup(trainer, None, "fit")
    for _ in range(epochs):
        run_epoch(bar, trainer, batches, validate)
    bar.on_train_end(trainer, None)
    bar.teardown(trainer, None, "fit")


def test_training_bar_shows_epoch_step_loss_and_metrics(capsys):
    fit(ProgressBar(), make_trainer(), epochs=2)
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert "Epoch 0" in err and "Epoch 1" in err
    assert "4/4" in err
    assert "step=8" in err and "loss=0.5" in err and "acc=0.875" in err


def test_validation_bar_and_val_metrics_on_training_bar(capsys):
    fit(ProgressBar(), make_trainer(), validate=True)
    err = capsys.readouterr().err
    assert "Validation" in err and "2/2" in err
    last_train_line = [line for line in re.split(r"[\r\n]", err) if "Epoch 0" in line][-1]
    assert "val_loss=0.25" in last_train_line


@pytest.mark.parametrize(
    ("start", "batch_end", "end", "attr", "desc"),
    [
        (
            "on_validation_start",
            "on_validation_batch_end",
            "on_validation_end",
            "num_val_batches",
            "Validation",
        ),
        ("on_test_start", "on_test_batch_end", "on_test_end", "num_test_batches", "Testing"),
        ("on_predict_start", "on_predict_batch_end", "on_predict_end", "num_predict_batches", "Predicting"),
    ],
)
def test_evaluation_bars_outside_fit(capsys, start, batch_end, end, attr, desc):
    trainer = make_trainer()
    setattr(trainer, attr, [3, 2])
    bar = ProgressBar()
    getattr(bar, start)(trainer, None)
    for i in range(5):
        getattr(bar, batch_end)(trainer, None, None, None, i)
    getattr(bar, end)(trainer, None)
    err = capsys.readouterr().err
    assert desc in err and "5/5" in err
    assert bar._eval is None


def test_unknown_lengths(capsys):
    trainer = make_trainer(num_training_batches=None, num_val_batches=[None])
    fit(ProgressBar(), trainer, batches=3, validate=True)
    err = capsys.readouterr().err
    assert re.search(r"Epoch 0: 3it", err)
    assert re.search(r"Validation: 2it", err)


@pytest.mark.parametrize(("kwargs", "rank"), [({}, 1), ({"refresh_rate": 0}, 0)])
def test_silent_on_other_ranks_and_when_disabled(capsys, kwargs, rank):
    trainer = make_trainer(rank=rank)
    fit(ProgressBar(**kwargs), trainer, validate=True)
    bar = ProgressBar(**kwargs)
    bar.on_test_start(trainer, None)
    bar.on_test_batch_end(trainer, None, None, None, 0)
    bar.on_test_end(trainer, None)
    assert capsys.readouterr() == ("", "")


def test_loss_is_read_only_when_the_bar_redraws(capsys):
    trainer = make_trainer(num_training_batches=1000)
    trainer.last_loss = CountingLoss(0.5)
    bar = ProgressBar(min_interval=3600.0)
    fit(bar, trainer, batches=1000)
    # The first batch draws, then the clock holds redraws back until the forced epoch-end redraw.
    assert trainer.last_loss.reads == 2
    assert "loss=0.5" in capsys.readouterr().err


@pytest.mark.parametrize(("refresh_rate", "reads"), [(1, 12 + 1), (4, 3 + 1), (5, 3 + 1)])
def test_refresh_rate_counts_batches(capsys, refresh_rate, reads):
    trainer = make_trainer(num_training_batches=12)
    trainer.last_loss = CountingLoss(0.5)
    fit(ProgressBar(refresh_rate=refresh_rate, min_interval=0.0), trainer, batches=12)
    assert trainer.last_loss.reads == reads  # per redraw, plus the epoch-end one


def test_skipped_loss_is_left_out(capsys):
    trainer = make_trainer()
    trainer.last_loss = None
    trainer.progress_bar_metrics = {}
    fit(ProgressBar(), trainer)
    err = capsys.readouterr().err
    assert "step=4" in err and "loss" not in err


def test_leave_keeps_one_bar_per_epoch(capsys):
    bar, trainer = ProgressBar(leave=True), make_trainer()
    bar.setup(trainer, None, "fit")
    run_epoch(bar, trainer, 4)
    assert bar._train is None  # closed (and left on screen) at the epoch end
    run_epoch(bar, trainer, 4)
    err = capsys.readouterr().err
    assert "Epoch 0: 100%" in err and "Epoch 1: 100%" in err


def test_exception_closes_bars(capsys):
    bar, trainer = ProgressBar(), make_trainer()
    bar.on_train_epoch_start(trainer, None)
    bar.on_validation_start(trainer, None)
    bar.on_exception(trainer, None, RuntimeError("boom"))
    assert bar._train is None and bar._eval is None


@pytest.mark.parametrize(
    "kwargs", [{"refresh_rate": -1}, {"refresh_rate": 1.5}, {"refresh_rate": True}, {"min_interval": -1}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ProgressBar(**kwargs)


# ---- end to end with a real Trainer ----------------------------------------------------------------


class Tiny(TrainModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("shown", 0.125, prog_bar=True)
        self.log("hidden", 0.25)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_shown", 0.375, prog_bar=True)

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_real_trainer(**kwargs):
    return Trainer(max_epochs=2, logger=False, enable_checkpointing=False, **kwargs)


def loader():
    return DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=4)


def test_fit_shows_the_default_bar(capsys):
    trainer = make_real_trainer()
    trainer.fit(Tiny(), loader(), loader())
    err = capsys.readouterr().err
    assert "Epoch 0" in err and "Epoch 1: 100%" in err and "3/3" in err and "Validation" in err
    last_line = [line for line in re.split(r"[\r\n]", err) if "Epoch 1" in line][-1]
    assert "step=6" in last_line and "loss=" in last_line
    assert "shown=0.125" in last_line and "val_shown=0.375" in last_line and "hidden" not in last_line


def test_test_stage_bar(capsys):
    trainer = make_real_trainer()
    trainer.test(Tiny(), loader())
    assert "Testing" in capsys.readouterr().err


def test_fit_without_progress_bar_is_quiet(capsys):
    make_real_trainer(enable_progress_bar=False).fit(Tiny(), loader(), loader())
    assert capsys.readouterr().err == ""


def test_tqdm_progress_bar_is_lightnings_name(capsys):
    from callbacks.progress import TQDMProgressBar

    bar = TQDMProgressBar(refresh_rate=2, process_position=1, leave=True)
    assert isinstance(bar, ProgressBar) and (bar.refresh_rate, bar.leave) == (2, True)
    fit(bar, make_trainer())
    assert "Epoch 0" in capsys.readouterr().err
    opened = TQDMProgressBar(process_position=2)._open("y", 1, position=1, leave=False)
    assert opened.tqdm.pos in (3, -3)  # tqdm stores its row, negated while the bar is open
    opened.tqdm.close()
    with pytest.raises(ValueError, match="process_position"):
        TQDMProgressBar(process_position=-1)
