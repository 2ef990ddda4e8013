"""The fit loop: epochs, batches, accumulation windows, optimizer steps — top to bottom.

Policy lives in components: the Strategy (placement, sync, collectives), the Precision plugin
(autocast, scaling, skip detection), GradientAccumulation (window rule), the callbacks. This file only
sequences them. The per-batch path does no host synchronisation unless a logger writes on that step.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from framework.optim import step_schedulers

if TYPE_CHECKING:
    from framework.trainer import Trainer


def run_fit(trainer: Trainer) -> None:
    """Train until max_epochs/max_steps is reached or a callback sets ``trainer.should_stop``."""
    t = trainer
    t._call_hooks("on_train_start")
    while not t.should_stop and not t._max_steps_reached() and t.current_epoch < t.max_epochs:
        finished = run_train_epoch(t, start=t._resume_batch)
        t._resume_batch = 0
        if finished:
            empty = t._batches_done == 0
            t.current_epoch += 1
            t._batches_done, t._epoch_finished = 0, False
            if empty:  # every further epoch would be empty too: without this, max_steps alone never ends
                warnings.warn(f"The training dataloader yielded no batches in epoch {t.current_epoch - 1}; "
                              "training stops. Check the dataset and limit_train_batches.", stacklevel=5)
                break
    t._call_hooks("on_train_end")


def run_train_epoch(t: Trainer, start: int = 0) -> bool:
    """One training epoch from batch ``start``; returns True when the epoch ran to its end."""
    module, cbs = t.module, t._callback_list
    feed = t._train_feed
    epoch = t.current_epoch
    t.num_training_batches = feed.num_batches
    plan = t._accumulation.plan(epoch, feed.num_batches)
    module.train()
    t._metrics.start_stage("train")
    t._epoch_finished = False
    with t._metrics.epoch_level():
        t._call_hooks("on_train_epoch_start")
    if start and t._validation_pending_at_resume(start):
        t._run_validation()  # the saved run checkpointed just before this validation point

    step = t._training_batch if module.automatic_optimization else t._manual_batch
    check_placement = t._fit_guard.epoch_start()  # every parameter now, then one per batch (no host sync)
    completed = True
    batch_idx = start - 1
    for batch_idx, batch, is_last in feed.epoch_batches(epoch, start):
        check_placement()
        t._batch_idx = batch_idx
        if cbs.on_train_batch_start:
            cbs.on_train_batch_start(t, module, batch, batch_idx)
        outputs = step(batch, batch_idx, is_last, plan)
        t._batches_done = batch_idx + 1
        if cbs.on_train_batch_end:
            cbs.on_train_batch_end(t, module, outputs, batch, batch_idx)
        if t._val_every and (batch_idx + 1) % t._val_every == 0 and not is_last:
            t._run_validation()
        if t.should_stop or t._max_steps_reached():
            completed = is_last
            break
    t._batches_done = batch_idx + 1

    if completed and t._should_validate_at_epoch_end():
        t._run_validation()
    t._epoch_finished = completed
    # The module's hook runs before the epoch is reduced, so what it logs reaches loggers, schedulers
    # (ReduceLROnPlateau) and the callbacks' on_train_epoch_end (EarlyStopping, ModelCheckpoint).
    with t._metrics.epoch_level():
        module.on_train_epoch_end()
    t._flush_epoch_metrics("train")
    if completed and module.automatic_optimization:  # manual optimization steps its own schedulers
        step_schedulers(t.lr_scheduler_configs, "epoch", epoch + 1, t.callback_metrics)
    with t._metrics.epoch_level():
        t._call_callbacks("on_train_epoch_end")
    if t._metrics.has_pending():  # a callback logged through module.log
        t._log_to_loggers(t._metrics.reduce_epoch())
    t._metrics.end_stage()
    return completed


class TrainingBatch:
    """The automatic-optimization step for one micro-batch, bound to one Trainer.

    Kept as a callable object so the per-batch path reads attributes it prepared once per run instead
    of looking them up through the Trainer every time.
    """

    def __init__(self, trainer: Trainer) -> None:
        t = self.t = trainer
        self.module = t.module
        self.strategy = t.strategy
        self.precision = t.precision_plugin
        self.optimizers = t.optimizers
        self.training_step = t.strategy.step_function("training_step")
        self.count_items = getattr(type(self.module), "num_items", None) is not None
        self.items: Any = 0
        self.nan_guard = t._nan_guard  # None unless nan_policy is "skip"/"stop": then one check per step
        self.has_hooks = {name: bool(getattr(t._callback_list, name)) or _overrides(self.module, name)
                          for name in ("on_before_backward", "on_after_backward", "on_before_optimizer_step")}
        for optimizer in self.optimizers:  # a window cut short by a stop in an earlier fit is not carried over
            self.strategy.zero_grad(optimizer)

    def __call__(self, batch: Any, batch_idx: int, is_last: bool, plan: Any) -> Any:
        t, strategy = self.t, self.strategy
        if strategy.needs_batch_transfer:
            batch = strategy.batch_to_device(batch)
        if self.precision.converts_input:
            batch = self.precision.convert_input(batch)
        if plan.k == 1:
            sync, divisor = True, 1
        else:
            sync, divisor = plan.window(batch_idx, is_last)
        t.sync_gradients = sync

        with strategy.no_sync(not sync):
            with self.precision.forward_context():
                output = self.training_step(batch, batch_idx)
            loss = loss_from_output(output)
            if loss is not None:
                t.last_loss = loss.detach()
                if self.nan_guard is not None:
                    self.nan_guard.observe(loss)
                if self.count_items:
                    self.items = self.items + self.module.num_items(batch)
                elif divisor != 1:
                    loss = loss / divisor
                if self.has_hooks["on_before_backward"]:
                    t._call_hooks("on_before_backward", loss)
                strategy.backward(loss)
                if self.has_hooks["on_after_backward"]:
                    t._call_hooks("on_after_backward")
        if sync:
            self.optimizer_step(batch_idx, plan)
        return output

    def optimizer_step(self, batch_idx: int, plan: Any) -> None:
        t, strategy, guard = self.t, self.strategy, self.t._fit_guard
        if self.nan_guard is not None and self.nan_guard.step_is_bad(t):
            self.skip_step()
            return
        factor = None
        if self.count_items:
            total = torch.as_tensor(self.items, dtype=torch.float64, device=strategy.root_device)
            total = strategy.all_reduce(total, "sum")
            factor = strategy.world_size / total.clamp_min(1)
            self.items = 0
        elif plan.k > 1:
            factor = plan.tail_correction(batch_idx)
        if factor is not None:
            strategy.scale_gradients(self.optimizers, factor)
        stepped, norms = True, []
        for optimizer in self.optimizers:
            if self.has_hooks["on_before_optimizer_step"]:
                self.precision.unscale_gradients(optimizer)
                t._call_hooks("on_before_optimizer_step", optimizer)
            if t.gradient_clip_val:
                norm = strategy.clip_gradients(optimizer, t.gradient_clip_val, t.gradient_clip_algorithm)
                if norm is not None:
                    norms.append(norm)
            guard.stepping = True  # this step is the Trainer's own, not a hand-called optimizer.step()
            stepped = strategy.optimizer_step(optimizer) and stepped
            guard.stepping = False
            strategy.zero_grad(optimizer)
        self.precision.finish_step()
        if norms:
            t.grad_norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(
                [n.to(norms[0]) for n in norms]))
        t._after_optimizer_step(stepped)

    def skip_step(self) -> None:
        """Drop the window's gradients without stepping (nan_policy); counted like an fp16-overflow skip."""
        for optimizer in self.optimizers:
            self.strategy.zero_grad(optimizer)
        self.items = 0
        self.t._after_optimizer_step(False)


def _overrides(module: Any, name: str) -> bool:
    from framework.module import TrainModule

    return getattr(type(module), name, None) is not getattr(TrainModule, name, None)


def loss_from_output(output: Any) -> torch.Tensor | None:
    """The loss of a ``training_step`` result: a tensor, ``{"loss": tensor}``, or None (skip the batch)."""
    if isinstance(output, torch.Tensor):
        loss = output
    elif output is None:
        return None
    elif isinstance(output, Mapping):
        if "loss" not in output:
            raise ValueError(f"training_step returned a dict without a 'loss' key (keys: {sorted(output)}); "
                             'return {"loss": loss, ...}, a loss tensor, or None to skip the batch.')
        loss = output["loss"]
        if loss is None:
            return None
    else:
        raise TypeError(f"training_step returned {type(output).__name__}; return a loss tensor, a dict with a "
                        "'loss' tensor, or None to skip the batch.")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"training_step returned loss={loss!r} ({type(loss).__name__}); the loss must be a tensor "
                        "computed from the model's outputs so that it can be backpropagated.")
    if loss.numel() != 1:
        raise ValueError(f"training_step returned a loss of shape {tuple(loss.shape)}; reduce it to a scalar "
                         "(e.g. loss.mean()) before returning it.")
    if not loss.requires_grad:
        raise ValueError("training_step returned a loss that does not require grad (computed under no_grad, "
                         "detached, or from frozen parameters only); return the loss from the model's forward.")
    return loss


class ManualOptimizer:
    """Wraps an optimizer for manual optimization so ``step()`` goes through the strategy and precision."""

    def __init__(self, optimizer: torch.optim.Optimizer, trainer: Trainer) -> None:
        self.optimizer = optimizer
        self._trainer = trainer

    def step(self, closure: Any = None) -> None:
        """Run ``closure`` (if given), then hooks, clipping and the step on true (unscaled) gradients.

        A step the fp16 scaler skips still counts in ``global_step`` and ``skipped_steps``. LR schedulers
        are not stepped: in manual optimization that is the user's call (``self.lr_schedulers()``).
        """
        t = self._trainer
        if closure is not None:
            closure()
        t.precision_plugin.unscale_gradients(self.optimizer)
        t._call_hooks("on_before_optimizer_step", self.optimizer)
        if t.gradient_clip_val:
            t.grad_norm = t.strategy.clip_gradients(self.optimizer, t.gradient_clip_val, t.gradient_clip_algorithm)
        stepped = t.strategy.optimizer_step(self.optimizer)
        t._after_optimizer_step(stepped, schedulers=False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


def run_manual_batch(t: Trainer, batch: Any, batch_idx: int, is_last: bool, plan: Any) -> Any:
    """Manual optimization: the user's training_step does backward and steps itself."""
    strategy = t.strategy
    if strategy.needs_batch_transfer:
        batch = strategy.batch_to_device(batch)
    if t.precision_plugin.converts_input:
        batch = t.precision_plugin.convert_input(batch)
    t.sync_gradients = True
    with t.precision_plugin.forward_context():
        output = t._training_step_fn(batch, batch_idx)
    t.precision_plugin.finish_step()  # the optimizers stepped in training_step share one scale update
    if isinstance(output, torch.Tensor):
        t.last_loss = output.detach()
    elif isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        t.last_loss = output["loss"].detach()
    return output
