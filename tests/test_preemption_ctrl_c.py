"""Ctrl-C (SIGINT) during fit: finish the step, checkpoint, exit with code 130; a second Ctrl-C aborts at once.

In-process cases raise the signal from a callback (see tests/preemption_signals.py); the real-process cases
send it to a launched job (one rank, and two ranks under Kiln's launcher and torchrun).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from preemption_signals import SendSignal, fit, handler_installed

from callbacks import Callback
from callbacks.preemption import INTERRUPTED_EXIT_CODE, TrainingInterrupted, TrainingPreempted
from framework.checkpoint import find_last, read_state, verify_checkpoint
from framework.testing import require_distributed


class Hooks(Callback):
    """Records on_exception and teardown calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def on_exception(self, trainer, module, exception):
        self.calls.append(("on_exception", exception))

    def teardown(self, trainer, module, stage):
        self.calls.append(("teardown", stage))


def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130(make_trainer, tiny_module_cls, make_loader, tmp_path,
                                                            capfd):
    before, hooks = signal.getsignal(signal.SIGINT), Hooks()
    trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(), [SendSignal(3, signal.SIGINT), hooks],
                       max_epochs=3)
    assert isinstance(exc, TrainingInterrupted) and exc.code == INTERRUPTED_EXIT_CODE == 130
    assert exc.global_step == trainer.global_step == 3 and exc.checkpoint == find_last(str(tmp_path / "checkpoints"))
    assert read_state(exc.checkpoint, "trainer")["loop"]["global_step"] == 3
    assert hooks.calls[0] == ("on_exception", exc)  # (Lightning runs no callback teardown after an exception)
    assert signal.getsignal(signal.SIGINT) is before
    err = capfd.readouterr().err
    assert "Ctrl-C: stopping after the current step and saving a checkpoint; press Ctrl-C again" in err
    final = [line for line in err.splitlines() if "stopped after global step 3" in line]
    assert len(final) == 1 and "ckpt_path='last'" in final[0] and "code 130" in final[0], err


def test_ctrl_c_without_checkpointing_still_stops_cleanly(make_trainer, tiny_module_cls, make_loader, capfd):
    trainer = make_trainer(callbacks=[SendSignal(2, signal.SIGINT)], max_epochs=3)  # checkpointing off
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(tiny_module_cls(), make_loader())
    assert info.value.code == 130 and info.value.checkpoint is None and trainer.global_step == 2
    assert "no checkpoint saved" in str(info.value) and "stopping after the current step;" in capfd.readouterr().err


def test_a_second_ctrl_c_aborts_at_once(make_trainer, tiny_module_cls, make_loader, tmp_path):
    class TwoPresses(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                assert handler_installed(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)  # KeyboardInterrupt here, before the step boundary acts
                raise AssertionError("the second Ctrl-C did not abort")

    before, hooks = signal.getsignal(signal.SIGINT), Hooks()
    trainer = make_trainer(enable_checkpointing=True, callbacks=[TwoPresses(), hooks], max_epochs=3)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(tiny_module_cls(), make_loader())
    assert trainer.global_step == 2 and hooks.calls[0][0] == "on_exception"
    assert isinstance(hooks.calls[0][1], KeyboardInterrupt)
    assert find_last(str(tmp_path / "checkpoints")) is None  # nothing saved on the way out
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_wins_over_ctrl_c(make_trainer, tiny_module_cls, make_loader):
    class Both(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)

    trainer, exc = fit(make_trainer, tiny_module_cls(), make_loader(), [Both()], max_epochs=3)
    assert type(exc) is TrainingPreempted and exc.code == 75 and exc.signal_name == "SIGTERM"


ELASTIC_RUN = os.path.join(os.path.dirname(__file__), "scripts", "elastic_run.py")


def _start(command: list[str]):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "KILN_LAUNCHER_PID")}
    return subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**env, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore",
                                                         "OMP_NUM_THREADS": "1"})


def _read_until(process, text: str) -> list[str]:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(text):
            return lines
    raise AssertionError(f"{text!r} never came:\n{''.join(lines)[-4000:]}")


def _finish(process, lines: list[str], timeout: float = 150) -> str:
    try:
        return "".join(lines) + process.communicate(timeout=timeout)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@require_distributed
@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["kiln", "torchrun"])
def test_ctrl_c_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path, launcher):
    """A terminal's Ctrl-C: under Kiln's launcher it reaches every rank (one process group); under torchrun it
    reaches torchrun, which forwards it to its workers (they run in sessions of their own)."""
    script = [ELASTIC_RUN, "--root", str(tmp_path), "--out", str(tmp_path / "out"), "--progress", "--slow", "0.02",
              "--max-epochs", "50"]
    if launcher == "kiln":
        process = _start([*script, "--devices", "2"])
    else:
        process = _start(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *script])
    lines = _read_until(process, "rank 0 step 3")
    if launcher == "kiln":
        os.killpg(process.pid, signal.SIGINT)
    else:
        os.kill(process.pid, signal.SIGINT)
    output = _finish(process, lines)
    assert sorted(re.findall(r"rank (\d) exits with (\d+)", output)) == [("0", "130"), ("1", "130")], output[-4000:]
    if launcher == "kiln":
        assert process.returncode == 130, output[-4000:]
    stopped = re.findall(r"\[kiln\] Ctrl-C: stopped after global step (\d+), saved checkpoint (\S+); resume with "
                         r"trainer.fit\(\.\.\., ckpt_path='last'\); exiting with code 130\.", output)
    assert len(stopped) == 1 and output.count("press Ctrl-C again to abort at once") == 1, output[-4000:]
    step, path = int(stopped[0][0]), stopped[0][1]
    assert path == find_last(str(tmp_path / "checkpoints")) and verify_checkpoint(path).global_step == step >= 3
    assert "done" not in output


@pytest.mark.timeout(300)
def test_a_second_ctrl_c_aborts_a_real_process_at_once(tmp_path):
    process = _start([ELASTIC_RUN, "--root", str(tmp_path), "--out", str(tmp_path / "out"), "--devices", "1",
                      "--strategy", "auto", "--progress", "--slow", "60"])  # a minute per step
    lines = _read_until(process, "rank 0 step 1")
    os.killpg(process.pid, signal.SIGINT)
    lines += _read_until(process, "[kiln] Ctrl-C: stopping after the current step")
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    output = _finish(process, lines, timeout=60)
    assert time.monotonic() - sent < 30 and process.returncode == -signal.SIGINT, output[-4000:]
    assert "[kiln] second Ctrl-C: aborting now." in output and "stopped after global step" not in output
