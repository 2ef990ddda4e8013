"""What to do when a training loss is not finite (NaN or ±inf): ``Trainer(nan_policy=...)``.

- ``"ignore"`` (default): nothing is checked, the step runs as usual (a NaN loss makes NaN weights). The
  per-batch path stays free of any extra work or host synchronisation.
- ``"skip"``: an optimizer step whose accumulation window saw a non-finite loss is skipped: gradients are
  dropped, parameters, optimizer state and step-interval LR schedulers stay as they were. The step still
  counts in ``trainer.global_step`` and in ``trainer.skipped_steps`` (as an fp16-overflow skip does).
- ``"stop"``: the step is skipped as for ``"skip"``, a checkpoint of that state is saved through the active
  ``ModelCheckpoint``, and :class:`NonFiniteLossError` is raised naming the step.

The check costs one device op per micro-batch (``isfinite`` folded into a flag) and one host read of that flag
per optimizer step; on several processes the flag is all-reduced first so that every rank skips (or stops at)
the same step — DDP averages gradients, so one rank's NaN poisons every rank's update. With an fp16 scaler
(``16-mixed``) overflowing *gradients* remain the scaler's business; ``nan_policy`` looks at the loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from callbacks.base import Callback

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

NAN_POLICIES = ("ignore", "skip", "stop")


class NonFiniteLossError(RuntimeError):
    """``nan_policy="stop"`` met a NaN/inf loss; ``global_step`` is the step, ``checkpoint`` what was saved."""

    def __init__(self, message: str, global_step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.global_step = global_step
        self.checkpoint = checkpoint


class NanGuard(Callback):
    """Watches training losses for ``nan_policy="skip"``/``"stop"``; the fit loop calls ``observe``/``step_is_bad``."""

    def __init__(self, policy: str) -> None:
        if policy not in ("skip", "stop"):
            raise ValueError(f"NanGuard(policy={policy!r}) is not valid; use 'skip' or 'stop'.")
        self.policy = policy
        self._finite: torch.Tensor | None = None
        self._stop: tuple[int, int, int] | None = None  # (global step, epoch, batch) of the step that stops fit

    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage == "fit" and not module.automatic_optimization:
            raise ValueError(f"nan_policy={self.policy!r} needs automatic optimization; with "
                             "automatic_optimization=False check the loss in training_step before stepping "
                             "(e.g. `if not torch.isfinite(loss): return`), or use nan_policy='ignore'.")
        self._finite, self._stop = None, None

    def observe(self, loss: torch.Tensor) -> None:
        """Fold one micro-batch's loss into the window's flag (a device op, no host sync)."""
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite

    def step_is_bad(self, trainer: Trainer) -> bool:
        """At an optimizer-step boundary: did any rank see a non-finite loss in this window? Resets the flag."""
        finite, self._finite = self._finite, None
        strategy = trainer.strategy
        if strategy.world_size > 1:
            bad = torch.zeros((), device=strategy.root_device) if finite is None else (~finite).float()
            bad = bool(strategy.all_reduce(bad.reshape(()), "max") > 0)
        else:
            bad = finite is not None and not bool(finite)
        if bad and self.policy == "stop":
            self._stop = (trainer.global_step, trainer.current_epoch, trainer._batch_idx)
        return bad

    def on_train_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._stop is None:
            return
        step, epoch, batch_idx = self._stop
        self._stop = None
        callback = trainer.checkpoint_callback
        path = callback.save_now(trainer) if callback is not None else None
        from framework.checkpoint.storage import redact

        saved = (f"the state with that step skipped was saved to {redact(path)} (resume it with ckpt_path=... "
                 "once the cause is fixed)" if path else "no checkpoint was saved (checkpointing is disabled)")
        raise NonFiniteLossError(
            f"nan_policy='stop': the training loss was not finite (NaN or inf) in the optimizer step at "
            f"global_step={step} (epoch {epoch}, batch {batch_idx}); its update was skipped and {saved}. Common "
            "causes: a learning rate that is too high, missing gradient clipping, bad input data, log/div of zero. "
            "nan_policy='skip' skips such steps and continues.", step, path)


def nan_guard(policy: Any) -> NanGuard | None:
    """The guard for ``Trainer(nan_policy=policy)``; None for "ignore" (nothing is checked)."""
    if policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={policy!r} is not valid; use 'ignore' (default: no check), 'skip' (skip "
                         "steps whose loss is NaN/inf) or 'stop' (checkpoint and raise at the first such step).")
    return None if policy == "ignore" else NanGuard(policy)
