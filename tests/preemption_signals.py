"""Signal senders and a fit wrapper shared by the preemption tests (tests/test_preemption*.py).

A sender refuses to raise a signal unless Kiln's handler is installed: a stray SIGTERM would end the test run.
"""

from __future__ import annotations

import signal

from callbacks import Callback
from callbacks.preemption import PreemptionHandler, TrainingPreempted


def handler_installed(sig: int) -> bool:
    return isinstance(getattr(signal.getsignal(sig), "__self__", None), PreemptionHandler)


class _Sender(Callback):
    """Sends ``sig`` to this process (once) when ``global_step >= step``, from the hook a subclass overrides."""

    def __init__(self, step: int, sig: int = signal.SIGTERM) -> None:
        self.step, self.sig, self.sent = step, sig, False

    def send(self, trainer) -> None:
        if not self.sent and trainer.global_step >= self.step:
            assert handler_installed(self.sig), "Kiln's handler is not installed: refusing to kill the test run"
            self.sent = True
            signal.raise_signal(self.sig)


class SendSignal(_Sender):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.send(trainer)


def send_from(hook: str, step: int, sig: int = signal.SIGTERM) -> Callback:
    """A sender that fires from ``hook`` (the callback list dispatches only hooks a class overrides)."""
    cls = type(f"SendFrom_{hook}", (_Sender,), {hook: lambda self, trainer, *args: self.send(trainer)})
    return cls(step, sig)


def fit(make_trainer, module, loader, callbacks, ckpt_path=None, val=None, **kwargs):
    trainer = make_trainer(enable_checkpointing=True, callbacks=callbacks, **kwargs)
    try:
        trainer.fit(module, loader, val, ckpt_path=ckpt_path)
    except TrainingPreempted as exc:
        return trainer, exc
    return trainer, None
