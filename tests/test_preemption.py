"""Preemption: SIGTERM/SIGUSR1 during fit → finish the optimizer step, checkpoint, exit with code 75.

The signals are sent by the test process to itself from a callback at a chosen step, so every case is
deterministic; a callback refuses to send one unless Kiln's handler is installed (a stray SIGTERM would end
the test run). Killing real processes at random moments is tests/test_fault_injection.py's job.

Ctrl-C (SIGINT) has its own file: tests/test_preemption_ctrl_c.py.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import warnings

import pytest
import torch
from preemption_signals import SendSignal, fit, handler_installed, send_from

from callbacks import Callback, ModelCheckpoint
from callbacks.preemption import (
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    PreemptionHandler,
    TrainingPreempted,
)
from framework.checkpoint import find_last, read_state, verify_checkpoint
from framework.testing import require_distributed, run_distributed


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_at_the_step_boundary_and_exits_75(make_trainer, tiny_module_cls, make_loader, tmp_path,
                                                             sig, capsys):
    before = signal.getsignal(sig)
    trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(), [SendSignal(3, sig)], max_epochs=3)
    assert isinstance(exc, SystemExit) and exc.code == PREEMPTED_EXIT_CODE == 75
    assert exc.global_step == trainer.global_step == 3 and exc.signal_name == signal.Signals(sig).name
    dirpath = str(tmp_path / "checkpoints")
    assert exc.checkpoint == find_last(dirpath) == os.path.join(dirpath, "epoch=0-step=3.ckpt")
    assert read_state(exc.checkpoint, "trainer")["loop"]["global_step"] == 3
    assert signal.getsignal(sig) is before  # handlers restored
    message = capsys.readouterr().err
    assert f"{signal.Signals(sig).name} received: stopped after global step 3" in message and "code 75" in message


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_resuming_last_after_preemption_equals_the_uninterrupted_run(make_trainer, tiny_module_cls, make_loader, sig):
    def loader():
        return make_loader(num_samples=24, batch_size=4, shuffle=True)

    torch.manual_seed(0)
    reference = tiny_module_cls()
    make_trainer(max_epochs=3).fit(reference, loader())

    torch.manual_seed(0)
    trainer, exc = fit(make_trainer, tiny_module_cls(), loader(), [SendSignal(8, sig)], max_epochs=3)
    assert exc is not None and exc.global_step == 8  # mid-epoch (6 batches per epoch)
    resumed = tiny_module_cls()
    trainer, exc = fit(make_trainer, resumed, loader(), [], ckpt_path="last", max_epochs=3)
    assert exc is None and trainer.global_step == 18
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed).values(), weights(reference).values()))


def test_a_signal_inside_an_accumulation_window_finishes_the_window(make_trainer, tiny_module_cls, make_loader):
    batches = []
    cb = send_from("on_train_batch_start", 0)  # during the window's first batch
    recorder = type("Recorder", (Callback,), {"on_train_batch_end": lambda s, t, m, o, b, i: batches.append(i)})()
    trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(num_samples=24), [cb, recorder],
                       accumulate_grad_batches=3, max_epochs=2)
    assert exc.global_step == 1 and batches == [0, 1, 2]
    loop = read_state(exc.checkpoint, "trainer")["loop"]
    assert (loop["batches_done"], loop["global_step"]) == (3, 1)


def test_a_signal_during_validation_is_acted_on_at_the_next_step(make_trainer, tiny_module_cls, make_loader):
    val_batches = []

    class Recorder(Callback):
        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx):
            val_batches.append(batch_idx)

    send = send_from("on_validation_batch_end", 2)
    trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(num_samples=24), [send, Recorder()],
                       val=make_loader(num_samples=12, batch_size=2), val_check_interval=2, limit_val_batches=3,
                       max_epochs=2)
    trainer_batches = read_state(exc.checkpoint, "trainer")["loop"]["batches_done"]
    assert val_batches == [0, 1, 2]  # validation ran to its end
    assert exc.global_step == 3 and trainer_batches == 3


def test_a_signal_after_the_last_step_still_checkpoints(make_trainer, tiny_module_cls, make_loader, tmp_path):
    send = send_from("on_train_epoch_end", 0)
    trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(), [send, ModelCheckpoint(save_top_k=0)],
                       max_epochs=1)
    assert exc is not None and exc.global_step == 5
    loop = read_state(find_last(str(tmp_path / "checkpoints")), "trainer")["loop"]
    assert (loop["epoch"], loop["batches_done"], loop["global_step"]) == (1, 0, 5)  # the epoch is complete
    trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(), [], ckpt_path="last", max_epochs=1)
    assert exc is None and trainer.global_step == 5  # nothing left to do


def test_on_preempt_exit_stops_without_saving(make_trainer, tiny_module_cls, make_loader, tmp_path):
    trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(), [SendSignal(2)], on_preempt="exit",
                       max_epochs=3)
    assert exc.code == 75 and exc.checkpoint is None and trainer.global_step == 2
    assert not (tmp_path / "checkpoints").exists() or find_last(str(tmp_path / "checkpoints")) is None
    assert "no checkpoint saved" in str(exc)


def test_a_signal_under_fast_dev_run_saves_nothing(make_trainer, tiny_module_cls, make_loader, tmp_path):
    """fast_dev_run writes no checkpoint (Lightning's rule), not even for a preemption: the run still stops."""
    with pytest.warns(UserWarning, match="fast_dev_run=3"):
        trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(), [SendSignal(1)], fast_dev_run=3)
    assert exc.code == 75 and exc.checkpoint is None and trainer.global_step == 1
    assert not (tmp_path / "checkpoints").exists() and "no checkpoint saved" in str(exc)


def test_async_save_is_committed_before_the_exit(make_trainer, tiny_module_cls, make_loader):
    callbacks = [ModelCheckpoint(every_n_train_steps=1, async_save=True, total_limit=2), SendSignal(3)]
    trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(), callbacks, max_epochs=2)
    assert verify_checkpoint(exc.checkpoint).global_step == 3


@pytest.mark.parametrize("kwargs", [dict(on_preempt=None), dict(on_preempt="auto", enable_checkpointing=False)])
def test_without_handling_signals_are_left_alone(make_trainer, tiny_module_cls, make_loader, kwargs):
    seen = []

    class Look(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(signal.getsignal(signal.SIGTERM))

    trainer = make_trainer(callbacks=[Look()], **kwargs)
    trainer.fit(tiny_module_cls(), make_loader())
    assert seen and all(handler is signal.SIG_DFL for handler in seen)
    handlers = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionHandler)]
    if kwargs["on_preempt"] is None:
        assert not handlers
    else:  # without checkpointing, "auto" still turns Ctrl-C into a clean stop (and leaves SIGTERM alone)
        assert [(h.action, h.signals) for h in handlers] == [("exit", (signal.SIGINT,))]


def test_only_the_chosen_signals_are_handled(make_trainer, tiny_module_cls, make_loader):
    handled = []

    class Look(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            handled.append((handler_installed(signal.SIGTERM), handler_installed(signal.SIGUSR1)))

    callbacks = [Look(), SendSignal(2, signal.SIGUSR1), PreemptionHandler(signals=[signal.SIGUSR1])]
    trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(), callbacks, max_epochs=2)
    assert exc.signal_name == "SIGUSR1" and set(handled) == {(False, True)}


def test_a_signal_that_was_not_acted_on_is_redelivered_to_the_previous_handler(make_trainer, tiny_module_cls,
                                                                               make_loader):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        send = send_from("on_fit_end", 0, signal.SIGUSR1)  # after training: nothing left to stop
        trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(), [send])
        assert exc is None and received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_handlers_are_restored_when_fit_fails(make_trainer, tiny_module_cls, make_loader):
    class Boom(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            raise ZeroDivisionError("boom")

    with pytest.raises(ZeroDivisionError):
        make_trainer(enable_checkpointing=True).fit(Boom(), make_loader())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_error_after_a_signal_is_reported_not_drowned_by_the_signal(make_trainer, tiny_module_cls, make_loader):
    class Boom(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == 2:
                raise ZeroDivisionError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(ZeroDivisionError):  # not a process killed by the re-delivered SIGTERM
        fit(make_trainer, Boom(), make_loader(), [send_from("on_train_batch_start", 2)], max_epochs=2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_fit_outside_the_main_thread_warns_and_trains(make_trainer, tiny_module_cls, make_loader):
    trainer, caught, errors = make_trainer(enable_checkpointing=True), [], []

    def run():
        try:
            with warnings.catch_warnings(record=True) as found:
                warnings.simplefilter("always")
                trainer.fit(tiny_module_cls(), make_loader())
            caught.extend(str(w.message) for w in found)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not errors and trainer.global_step == 5
    assert any("main thread" in message for message in caught)


@pytest.mark.parametrize("kwargs, match", [
    (dict(on_preempt="sometimes"), "on_preempt='sometimes' is not valid"),
    (dict(on_preempt="checkpoint", enable_checkpointing=False), "needs a ModelCheckpoint"),
    (dict(on_preempt="exit", callbacks=[PreemptionHandler()]), "configure preemption in one place"),
])
def test_bad_arguments_are_refused(make_trainer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(**kwargs)


@pytest.mark.parametrize("kwargs, match", [(dict(action="save"), "action='save'"),
                                           (dict(check_every_n_steps=0), "check_every_n_steps=0")])
def test_handler_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreemptionHandler(**kwargs)


def test_the_automatic_check_interval_aims_at_half_a_second(monkeypatch):
    import callbacks.preemption as preemption

    handler, now = PreemptionHandler(), [100.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    handler._last_check = (0, 100.0)
    now[0] = 101.0  # 200 steps took a second
    assert handler._proposed_interval(200) == int(preemption.CHECK_INTERVAL_S / 0.005)
    now[0] = 101.0 + 60  # one step took a minute: check every step
    assert handler._proposed_interval(201) == 1
    assert handler._proposed_interval(201) == 1  # no step since the last check


@pytest.mark.timeout(180)
def test_a_signal_to_the_whole_process_group_spares_the_dataloader_workers(tmp_path):
    """SLURM signals every process of a job. torch makes DataLoader workers die on SIGTERM, which would fail the
    next batch before the step boundary; workers forked during fit start with the signals blocked."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "scripts", "resumable_run.py")
    process = subprocess.Popen(
        [sys.executable, script, "--root", str(tmp_path), "--out", str(tmp_path / "out.safetensors"), "--workers",
         "2", "--progress", "--max-epochs", "50", "--samples", "64", "--precision", "32-true", "--accumulate", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("step 6"):
                os.killpg(process.pid, signal.SIGTERM)  # the trainer and both workers
                break
        output = "".join(lines) + process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 75, output[-3000:]
    assert "DataLoader worker" not in output and "SIGTERM received: stopped after global step" in output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert find_last(str(tmp_path / "checkpoints")) is not None


def test_the_launcher_knows_the_exit_code():
    from framework import launch

    assert (launch._PREEMPTED, launch._INTERRUPTED) == (PREEMPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE)


# ---- two ranks: the signal reaches one of them ----------------------------------------------------------------


class _SlowSteps(Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        time.sleep(0.01)


def _one_rank_signalled_job(root: str) -> None:
    from dist_common import Regression, loader

    from framework import Trainer

    rank = int(os.environ["RANK"])
    for every in (1, 3, None):
        callbacks = [ModelCheckpoint(save_top_k=0), PreemptionHandler(check_every_n_steps=every)]
        if rank == 1:
            callbacks.insert(0, SendSignal(3))
        if every is None:  # the automatic interval: ~0.5 s, about 50 of these steps
            callbacks.insert(0, _SlowSteps())
        trainer = Trainer(devices=2, strategy="ddp", max_epochs=20, logger=False, enable_progress_bar=False,
                          default_root_dir=os.path.join(root, str(every)), callbacks=callbacks)
        with pytest.raises(TrainingPreempted) as info:
            trainer.fit(Regression(), loader(32, 2))
        exc = info.value
        print(f"PREEMPTED every={every} rank={rank} step={exc.global_step} checkpoint={exc.checkpoint}", flush=True)


@require_distributed
@pytest.mark.distributed
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    here = os.path.dirname(__file__)
    results = run_distributed(_one_rank_signalled_job, nproc=2, timeout=120, args=(str(tmp_path),), stream=False,
                              env={"PYTHONPATH": os.path.join(here, "distributed")})
    # The vote started at step 3 (when rank 1 got the signal) is read at the next check: step 4 when checking
    # every step, step 6 every 3 steps, within about two half-second intervals by default (160 steps in all).
    # Every rank stops at the same step, with one shared checkpoint.
    for every, stop_steps in ((1, {4}), (3, {6}), (None, range(4, 150))):
        found = [re.search(rf"PREEMPTED every={every} rank=(\d) step=(\d+) checkpoint=(\S+)", r.stdout)
                 for r in results]
        assert all(found), [r.stdout for r in results]
        steps = [int(m[2]) for m in found]
        assert steps[0] == steps[1] and steps[0] in stop_steps, (every, steps)
        assert found[0][3] == found[1][3] == find_last(str(tmp_path / str(every) / "checkpoints"))
        assert read_state(found[0][3], "trainer")["loop"]["global_step"] == steps[0]
