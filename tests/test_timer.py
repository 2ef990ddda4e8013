"""Timer: duration formats, stopping mid-epoch or at epoch end, stage times, state across a resume."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
from conftest import TinyModule

from callbacks.timer import Timer, parse_duration
from framework.testing import require_distributed, run_distributed


class Slow(TinyModule):
    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("duration", "seconds"), [("00:00:01:30", 90.0), ("1:02:00:00", 93600.0),
                                                   (timedelta(minutes=2), 120.0), ({"hours": 1, "seconds": 5}, 3605.0),
                                                   (None, None)])
def test_duration_formats(duration, seconds):
    assert parse_duration(duration) == seconds
    assert Timer(duration).time_remaining() == seconds


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"duration": "1:30"}, ValueError, "DD:HH:MM:SS"), ({"duration": {"hour": 1}}, ValueError, "timedelta"),
    ({"duration": 5}, TypeError, "duration"), ({"interval": "batch"}, ValueError, "interval")])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Timer(**kwargs)


def test_stops_mid_epoch_at_step_interval(make_trainer, make_loader, capsys):
    timer = Timer(duration=timedelta(seconds=0.15), interval="step")
    trainer = make_trainer(max_epochs=1, callbacks=[timer])
    trainer.fit(Slow(), make_loader(num_samples=400, batch_size=4))  # 100 batches of >= 20 ms
    assert 0 < trainer.global_step < 50
    assert timer.time_elapsed("train") >= 0.15
    assert timer.time_remaining() <= 0
    assert "Time limit reached. Elapsed time is 0:00:00. Signaling Trainer to stop." in capsys.readouterr().out


def test_stops_at_epoch_end_at_epoch_interval(make_trainer, make_loader):
    timer = Timer(duration=timedelta(seconds=0.05), interval="epoch", verbose=False)
    trainer = make_trainer(max_epochs=5, callbacks=[timer])
    trainer.fit(Slow(), make_loader(num_samples=20, batch_size=4))
    assert (trainer.current_epoch, trainer.global_step) == (1, 5)  # the whole first epoch, then stop


def test_stage_times(make_trainer, make_loader):
    timer = Timer()
    trainer = make_trainer(callbacks=[timer])
    module = TinyModule()
    trainer.fit(module, make_loader(), make_loader())
    trainer.test(module, make_loader())
    for stage in ("train", "validate", "test"):
        assert timer.start_time(stage) is not None and timer.end_time(stage) >= timer.start_time(stage)
        assert timer.time_elapsed(stage) == pytest.approx(timer.end_time(stage) - timer.start_time(stage))
    assert timer.start_time("predict") is None and timer.time_elapsed("predict") == 0.0
    assert timer.time_remaining() is None
    with pytest.raises(ValueError, match="stage"):
        timer.time_elapsed("training")


def test_elapsed_time_survives_a_checkpoint(make_trainer, make_loader, tmp_path):
    first = Timer(duration="00:01:00:00")
    trainer = make_trainer(max_epochs=1, callbacks=[first])
    trainer.fit(Slow(), make_loader())
    trainer.save_checkpoint(str(tmp_path / "ckpt"))
    spent = first.time_elapsed("train")
    assert first.state_dict()["time_elapsed"]["train"] == pytest.approx(spent)

    second = Timer(duration="00:01:00:00")
    resumed = make_trainer(max_epochs=2, callbacks=[second])
    resumed.fit(Slow(), make_loader(), ckpt_path=str(tmp_path / "ckpt"))
    assert second._offset == pytest.approx(spent)
    assert second.time_elapsed("train") > spent
    assert second.time_remaining() == pytest.approx(3600 - second.time_elapsed("train"))


def test_resumed_budget_already_spent_stops_at_fit_start(make_trainer, make_loader):
    timer = Timer(duration={"seconds": 10}, verbose=False)
    timer.load_state_dict({"time_elapsed": {"train": 10.0}})
    trainer = make_trainer(max_epochs=3, callbacks=[timer])
    trainer.fit(TinyModule(), make_loader())
    assert trainer.global_step == 0
    assert timer.time_elapsed() >= 10.0


def _two_rank_timer_job() -> None:
    from dist_common import Regression, loader

    from framework import Trainer

    class SlowOnRank0(Regression):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_rank == 0:
                time.sleep(0.03)  # only rank 0 runs out of time by its own clock
            return super().training_step(batch, batch_idx)

    trainer = Trainer(devices=2, strategy="ddp", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, callbacks=[Timer(duration=timedelta(seconds=0.2), verbose=False)])
    trainer.fit(SlowOnRank0(), loader(400, 2))
    steps = trainer.strategy.all_gather(torch.tensor([trainer.global_step]))
    assert steps[0].item() == steps[1].item() < 100, steps  # rank 0's decision reached rank 1 at the same step


@require_distributed
@pytest.mark.distributed
def test_ranks_stop_at_the_same_step():
    run_distributed(_two_rank_timer_job, nproc=2, timeout=180, stream=False,
                    env={"PYTHONPATH": os.path.join(os.path.dirname(__file__), "distributed")})
