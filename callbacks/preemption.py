"""Preemption and Ctrl-C: on SIGTERM/SIGUSR1 (exit 75) or SIGINT (exit 130), finish the optimizer step, save a
checkpoint, exit.

Schedulers (SLURM, Kubernetes, spot VMs) send SIGTERM — SLURM the signal chosen with ``--signal``, often
SIGUSR1 — some time before they kill a job. The signal handler only records the signal; the Trainer acts at
the next optimizer-step boundary, where the state is consistent: it saves a checkpoint through the active
``ModelCheckpoint`` (so ``ckpt_path="last"`` resumes from it, bit-exactly) and raises
:class:`TrainingPreempted`, a ``SystemExit`` with code :data:`PREEMPTED_EXIT_CODE`. A signal that arrives
during validation is acted on after it; one that arrives after the last step, at the end of training.

On several processes the signal may reach one rank only, and all ranks must stop at the same step. Ranks
compare notes through a two-element all_reduce on a separate gloo group (the largest signal number seen, and
the next check's distance in steps), started asynchronously at one check and read at the next, so it overlaps
with training instead of adding a round trip to a step. By default checks are about ``CHECK_INTERVAL_S`` apart
(each rank proposes the number of steps that takes; the smallest proposal wins, so all ranks agree), which keeps
their cost out of the step time; a job stops within about two intervals of the signal. On one process the
check is an attribute read after every optimizer step.

Ctrl-C (SIGINT) takes the same path and exits with code 130 (:class:`TrainingInterrupted`) and a one-line
message saying how to resume; a second Ctrl-C aborts at once (``KeyboardInterrupt`` at the next Python line;
a third one, should the process be stuck in native code, kills it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from callbacks.base import Callback

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

#: Exit status of a preempted run (sysexits' EX_TEMPFAIL: "temporary failure, retry later").
PREEMPTED_EXIT_CODE = 75
#: Exit status of a run stopped by Ctrl-C (the shell's 128 + SIGINT).
INTERRUPTED_EXIT_CODE = 130
ON_PREEMPT = ("auto", "checkpoint", "exit", None)
CHECK_INTERVAL_S = 0.5  # multi-process: the time between two checks that the automatic interval aims at
_MAX_INTERVAL = 10_000
DEFAULT_SIGNALS: tuple[int, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None)


class TrainingPreempted(SystemExit):
    """Raised by ``trainer.fit`` after a preemption signal; uncaught, the process exits with code 75.

    ``checkpoint`` is the path saved (None for ``on_preempt="exit"``), ``global_step`` the step it holds.
    """

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, signal_name: str, global_step: int, checkpoint: str | None) -> None:
        super().__init__(self.exit_code)
        self.signal_name = signal_name
        self.global_step = global_step
        self.checkpoint = checkpoint

    def _saved(self) -> str:
        from framework.checkpoint import redact

        return (f"saved checkpoint {redact(self.checkpoint)}; resume with trainer.fit(..., ckpt_path='last')"
                if self.checkpoint else "no checkpoint saved (on_preempt='exit', or checkpointing is off)")

    def __str__(self) -> str:
        return (f"{self.signal_name} received: stopped after global step {self.global_step}, {self._saved()}; "
                f"exiting with code {self.exit_code}.")


class TrainingInterrupted(TrainingPreempted):
    """Raised by ``trainer.fit`` after Ctrl-C (SIGINT); uncaught, the process exits with code 130."""

    exit_code = INTERRUPTED_EXIT_CODE

    def __str__(self) -> str:
        return f"Ctrl-C: stopped after global step {self.global_step}, {self._saved()}; exiting with code 130."


class PreemptionHandler(Callback):
    """Turns ``signals`` into a checkpoint (``action="checkpoint"``) or a bare stop (``"exit"``) plus exit 75.

    Installed by ``Trainer(on_preempt=...)``; pass one in ``callbacks`` to choose the signals or
    ``check_every_n_steps``: how often the ranks of a multi-process job compare notes (at the global steps
    divisible by it; None: about every ``CHECK_INTERVAL_S`` seconds).
    """

    def __init__(self, action: str = "checkpoint", signals: Iterable[int] = DEFAULT_SIGNALS,
                 check_every_n_steps: int | None = None) -> None:
        if action not in ("checkpoint", "exit"):
            raise ValueError(f"PreemptionHandler(action={action!r}) is not valid; use 'checkpoint' or 'exit'.")
        every = check_every_n_steps
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"PreemptionHandler(check_every_n_steps={check_every_n_steps!r}) is not valid; use an "
                             "int >= 1, or None for about every half second.")
        self.action = action
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.check_every_n_steps = check_every_n_steps
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._vote: _Vote | _SyncVote | None = None
        self._next_check = 0  # automatic interval: the global step of the next check
        self._last_check = (0, 0.0)  # (global step, time) of the previous check
        self._announce = True  # this rank prints what a Ctrl-C does (rank 0)
        self._interrupts = 0  # Ctrl-Cs since the handlers were installed

    # ---- signal handlers ----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # the second Ctrl-C: abort; a third one kills outright
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _say("[kiln] second Ctrl-C: aborting now.", self._announce)
                raise KeyboardInterrupt
            saving = " and saving a checkpoint" if self.action == "checkpoint" else ""
            _say(f"[kiln] Ctrl-C: stopping after the current step{saving}; press Ctrl-C again to abort at once.",
                 self._announce)
        # The largest signal number wins, on this rank as in the ranks' vote: SIGTERM (preempted) over SIGINT.
        if self.received is None or sig > self.received:
            self.received = sig

    def install(self) -> bool:
        """Record ``signals`` instead of dying on them (main thread only); False when it cannot."""
        if self._previous:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        self.received, self._interrupts = None, 0
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        _shield_forked_children(self.signals)
        return True

    def uninstall(self, redeliver: bool = True) -> None:
        """Put the previous handlers back; a signal received but not acted on is re-delivered to them."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if previous:
            _shield_forked_children(())
        pending, self.received = self.received, None
        if redeliver and previous and pending is not None:
            signal.raise_signal(pending)

    # ---- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.action == "checkpoint" and trainer.checkpoint_callback is None:
            raise ValueError("on_preempt='checkpoint' needs a ModelCheckpoint callback to save through; enable "
                             "checkpointing, or use on_preempt='exit' or None.")
        self._vote = _Vote.create(trainer.strategy) if trainer.world_size > 1 else None
        self._next_check, self._last_check = 0, (trainer.global_step, time.monotonic())
        self._announce = trainer.is_global_zero
        if not self.install():
            import warnings

            warnings.warn("Preemption handling is off: signal handlers can only be installed when trainer.fit() "
                          "runs in the main thread.", stacklevel=2)

    def on_train_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._previous or not trainer.sync_gradients:
            return
        if self._vote is None:
            if self.received is not None:
                self._preempt(trainer, self.received.name)
        elif self.check_every_n_steps is not None:
            if trainer.global_step % self.check_every_n_steps == 0:
                self._check(trainer, 1)
        elif trainer.global_step >= self._next_check:
            self._check(trainer, self._proposed_interval(trainer.global_step))

    def _proposed_interval(self, step: int) -> int:
        """Steps that take about CHECK_INTERVAL_S on this rank, measured since the previous check."""
        now = time.monotonic()
        (last_step, last_time), self._last_check = self._last_check, (step, now)
        if step <= last_step or now <= last_time:
            return 1
        per_step = (now - last_time) / (step - last_step)
        return max(1, min(_MAX_INTERVAL, int(CHECK_INTERVAL_S / per_step)))

    def _check(self, trainer: Trainer, proposed: int) -> None:
        signum, interval = self._vote.poll(int(self.received or 0), proposed)
        self._next_check = trainer.global_step + interval
        if signum:
            self._preempt(trainer, signal.Signals(signum).name)

    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        """Training ended (or stopped) with a signal still pending: act on it now rather than drop it."""
        if not self._previous:
            return
        signum = int(self.received or 0)
        if self._vote is not None:
            signum = self._vote.final(signum)
        if signum:
            self._preempt(trainer, signal.Signals(signum).name)

    def teardown(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        self._vote = None
        self.uninstall()

    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        self._vote = None  # a pending vote may involve a dead rank: dropped, not awaited
        self.uninstall(redeliver=False)  # the process is ending with this exception: let it be reported

    # ---- acting --------------------------------------------------------------------------------
    def _preempt(self, trainer: Trainer, signal_name: str) -> None:
        path = None
        if self.action == "checkpoint":
            path = trainer.checkpoint_callback.save_now(trainer)
        self.received = None  # acted on: nothing to re-deliver
        stopped = TrainingInterrupted if signal_name == "SIGINT" else TrainingPreempted
        exc = stopped(signal_name, trainer.global_step, path)
        if trainer.is_global_zero:
            sys.stderr.write(f"[kiln] {exc}\n")
            sys.stderr.flush()
        raise exc


def _say(line: str, announce: bool) -> None:
    """One line on stderr from a signal handler (a raw write: the interrupted code may be inside print)."""
    if announce:
        os.write(2, f"\n{line}\n".encode())


_shielded: tuple[int, ...] = ()  # blocked in processes forked while a handler is installed


def _shield_forked_children(signals: tuple[int, ...]) -> None:
    """Processes forked from now on start with ``signals`` blocked (none: stop doing so).

    DataLoader workers are forked, and torch makes them die on SIGTERM: a signal sent to the whole process
    group (as SLURM does) would kill them and fail the next batch before the step boundary. Blocked, they
    ignore it and keep feeding batches; they still stop with their DataLoader or when this process exits.
    Workers started with "spawn"/"forkserver" are not covered.
    """
    global _shielded
    _shielded = tuple(signals)


def _block_in_child() -> None:
    if _shielded and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _shielded)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_block_in_child)


class _Vote:
    """What all ranks agree on at a check, one asynchronous all_reduce per poll: the largest signal number seen
    (0: none) and the smallest proposed interval to the next check."""

    _side: tuple[Any, Any] | None = None  # (default group, its gloo side group), created once per process group

    def __init__(self, group: Any) -> None:
        import torch
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.buffer = torch.zeros(2, dtype=torch.int64)  # [signal, -interval]: MAX gives both
        self.work: Any = None

    @classmethod
    def create(cls, strategy: Any) -> _Vote | _SyncVote:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return _SyncVote(strategy)  # e.g. XLA: the strategy's own collective, synchronously
        default = dist.group.WORLD
        if cls._side is None or cls._side[0] is not default:  # collective: all ranks run setup("fit") together
            cls._side = (default, dist.new_group(backend="gloo"))
        return cls(cls._side[1])

    def poll(self, signum: int, interval: int = 1) -> tuple[int, int]:
        """The agreement of the previous poll ((0, 1) at the first); starts the next with this rank's values."""
        decided = (0, 1)
        if self.work is not None:
            self.work.wait()
            decided = (int(self.buffer[0]), -int(self.buffer[1]))
        self.buffer[0], self.buffer[1] = signum, -interval
        self.work = self.dist.all_reduce(self.buffer, op=self.dist.ReduceOp.MAX, group=self.group, async_op=True)
        return decided

    def final(self, signum: int) -> int:
        """A synchronous last decision (the end of training): the pending poll's signal, or anyone's now."""
        decided = self.poll(signum)[0]
        self.work.wait()
        self.work = None
        return decided or int(self.buffer[0])


class _SyncVote:
    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    def poll(self, signum: int, interval: int = 1) -> tuple[int, int]:
        import torch

        values = torch.tensor([signum, -interval], device=self.strategy.root_device)
        reduced = self.strategy.all_reduce(values, "max").tolist()
        return int(reduced[0]), -int(reduced[1])

    def final(self, signum: int) -> int:
        return self.poll(signum)[0]


def preemption_callbacks(callbacks: list[Callback], on_preempt: Any) -> list[Callback]:
    """``callbacks`` plus the PreemptionHandler that ``Trainer(on_preempt=...)`` asks for (appended last)."""
    if on_preempt not in ON_PREEMPT:
        raise ValueError(f"on_preempt={on_preempt!r} is not valid; use 'checkpoint' (save, then exit with code "
                         f"{PREEMPTED_EXIT_CODE}), 'exit' (exit without saving), None (no signal handling) or "
                         "'auto' (checkpoint when a ModelCheckpoint is active).")
    given = [cb for cb in callbacks if isinstance(cb, PreemptionHandler)]
    if given:
        if on_preempt != "auto":
            raise ValueError(f"on_preempt={on_preempt!r} was given together with a PreemptionHandler callback; "
                             "configure preemption in one place.")
        return callbacks
    from callbacks.checkpoint import ModelCheckpoint

    has_checkpoint = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)
    if on_preempt == "auto" and not has_checkpoint:  # Ctrl-C still stops cleanly; SIGTERM keeps its default
        return [*callbacks, PreemptionHandler("exit", signals=(signal.SIGINT,))]
    if on_preempt == "auto":
        on_preempt = "checkpoint"
    if on_preempt is None:
        return callbacks
    if on_preempt == "checkpoint" and not has_checkpoint:
        raise ValueError("on_preempt='checkpoint' needs a ModelCheckpoint to save through, but checkpointing is "
                         "disabled; enable it (enable_checkpointing=True), or use on_preempt='exit' or None.")
    return [*callbacks, PreemptionHandler(on_preempt)]
