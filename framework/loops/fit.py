"""The fit loop: sanity check, epochs, batches, in-epoch validation — top to bottom, owning its progress.

``FitLoop`` holds where training stands (epoch, batch position, global step, the validation schedule,
the resume point) and saves/restores exactly that with ``state_dict``. The Trainer exposes read-only
views of it (``current_epoch``, ``global_step``, ``batch_idx``). What happens inside one batch lives
in ``framework.loops.step``; evaluation in ``framework.loops.evaluation``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from framework.loops.evaluation import EvaluationLoop
from framework.loops.step import AutomaticStep, ManualStep
from framework.loops.transfer import LoopTransfer
from framework.metrics import MetricCollector
from framework.optim import step_schedulers
from framework.rng import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from framework.hooks import HookCaller
    from framework.trainer import Trainer


class FitLoop:
    """Training progress and the epoch loop of one Trainer."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer
        self.epoch = 0
        self.global_step = 0
        self.skipped_steps = 0
        self.batch_idx = 0
        self.batches_done = 0  # batches of the current epoch already trained
        self.epoch_finished = False  # the current epoch's end-of-epoch work already ran
        self.resume_at = 0  # the batch the next epoch run starts at (mid-epoch resume)
        self.validation_pending = False  # resumed at an in-epoch validation point the saved run had not run
        self.validated_at: tuple[int, int] | None = None
        self.val_every: int | None = None
        self.plan: Any = None
        self.train_feed: Any = None
        self.val_feeds: list[Any] = []
        self.pending_data_state: tuple[dict[str, Any] | None, dict[str, Any] | None] | None = None
        self.hooks: HookCaller | None = None
        self.warned_minimum = False
        self.stopped_in_epoch = False  # the run ended inside an epoch (a stop or max_steps): see current_epoch

    @property
    def current_epoch(self) -> int:
        """Lightning's count: an epoch a stop cut short counts as done once its end hooks ran. The resume point
        (``epoch``, ``batches_done``) stays inside that epoch, so resuming still continues it exactly."""
        return self.epoch + self.stopped_in_epoch

    # ---- progress state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "epoch_finished": self.epoch_finished,
                "global_step": self.global_step, "skipped_steps": self.skipped_steps,
                "validated": self.validated_at == (self.epoch, self.batches_done)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.skipped_steps = int(state["skipped_steps"])
        if state["epoch_finished"]:
            self.epoch, self.resume_at, self.validation_pending = int(state["epoch"]) + 1, 0, False
        else:
            self.epoch, self.resume_at = int(state["epoch"]), int(state["batches_done"])
            self.validation_pending = not state.get("validated", False)
        self.batches_done = self.resume_at
        self.stopped_in_epoch = False

    def data_state(self) -> dict[str, Any] | None:
        """This rank's position in the training data (saved per rank)."""
        if self.train_feed is not None:
            return self.train_feed.state_dict()
        return self.pending_data_state[0] if self.pending_data_state else None

    def defer_data_state(self, state: dict[str, Any] | None, saved_accumulation: dict[str, Any] | None) -> None:
        """Keep a restored data position until the training loader is built (``attach_data_state``)."""
        self.pending_data_state = (state, saved_accumulation)

    def attach_data_state(self) -> None:
        """Put the restored position into the new training feed; on another number of processes map it first
        (collective: every rank takes rank 0's saved position)."""
        if self.pending_data_state is None:
            return
        from framework.reshard import reshard_resume

        t = self.t
        state, saved_accumulation = self.pending_data_state
        self.pending_data_state = None
        loaded = self.state_dict()
        loop, state = reshard_resume(loaded, state, t.strategy.broadcast(state), feed=self.train_feed,
                                     accumulation=t.accumulation, saved_accumulation=saved_accumulation)
        if not self.epoch_finished and loop["batches_done"] != loaded["batches_done"]:
            self.resume_at = self.batches_done = int(loop["batches_done"])
        if state:
            self.train_feed.load_state_dict(state)

    # ---- the run -------------------------------------------------------------------------------------
    def run(self, hooks: HookCaller, data: Any) -> None:
        """Sanity check, then train until max_epochs/max_steps/max_time or ``trainer.should_stop``."""
        t = self.t
        self.hooks, self.warned_minimum, self.stopped_in_epoch = hooks, False, False
        self.sanity_check(hooks, data)  # requests the validation loaders when it runs (Lightning's order)
        self.train_feed = data.train_feed()
        self.attach_data_state()
        self.val_feeds = data.feeds("validate") if t.validation_enabled else []
        if not t.validation_enabled and t.limits["validate"] != 0 and data.loaders_given("validate"):
            warnings.warn(f"trainer.fit() got validation data but {type(t.module).__name__} defines no "
                          "validation_step(); validation is skipped. Define validation_step to validate.", stacklevel=5)
        module = t.module
        if not module.automatic_optimization:
            _check_manual_optimization(t)
        self.step = AutomaticStep(t, self, hooks) if module.automatic_optimization else ManualStep(t, hooks)
        self.transfer = LoopTransfer(module, t.datamodule, t.strategy, t.precision_plugin)
        hooks.both("on_train_start")
        while not self.done():
            if self.epoch > 0 and data.reload_due(self.epoch) and self.resume_at == 0:
                self.train_feed = data.train_feed(reload=True)
                self.val_feeds = data.feeds("validate", reload=True) if t.validation_enabled else []
            finished = self.run_epoch(start=self.resume_at)
            self.resume_at, self.stopped_in_epoch = 0, not finished
            if finished:
                empty = self.batches_done == 0
                self.epoch += 1
                self.batches_done, self.epoch_finished = 0, False
                if empty:  # every further epoch would be empty too: without this, max_steps alone never ends
                    warnings.warn(f"The training dataloader yielded no batches in epoch {self.epoch - 1}; "
                                  "training stops. Check the dataset and limit_train_batches.", stacklevel=5)
                    break
        hooks.both("on_train_end")

    def done(self) -> bool:
        t = self.t
        if self.max_steps_reached() or self.epoch >= t.max_epochs:
            return True
        return t.should_stop and self.minimum_reached()

    def minimum_reached(self) -> bool:
        """``min_epochs``/``min_steps`` hold off a stop a callback requested; the request stays, so training stops
        as soon as both are reached (Lightning's semantics)."""
        t = self.t
        reached = self.epoch >= (t.min_epochs or 0) and self.global_step >= (t.min_steps or 0)
        if t.should_stop and not reached and not self.warned_minimum:
            self.warned_minimum = True
            warnings.warn(f"A stop was requested at epoch {self.epoch}, step {self.global_step}, but training "
                          f"continues until min_epochs={t.min_epochs} and min_steps={t.min_steps} are reached.",
                          stacklevel=4)
        return reached

    def max_steps_reached(self) -> bool:
        return 0 <= self.t.max_steps <= self.global_step

    def sanity_check(self, hooks: HookCaller, data: Any) -> None:
        """A few validation batches before training, so a broken validation_step fails in seconds. Nothing it
        does is observable afterwards: metrics are discarded and the random generators restored."""
        t = self.t
        steps = t.num_sanity_val_steps
        if not t.validation_enabled or steps == 0 or self.resume_at:
            return
        rng, metrics = capture_rng_state(), t._metrics
        t._metrics = MetricCollector()  # what the sanity check logs is thrown away (as in Lightning)
        t._metrics.reduce = metrics.reduce
        t.sanity_checking = True
        hooks.callbacks("on_sanity_check_start")
        try:
            self.val_feeds = data.feeds("validate")
            EvaluationLoop(t, hooks, "validate", self.val_feeds, max_batches=None if steps < 0 else steps).run()
            hooks.callbacks("on_sanity_check_end")
        finally:
            t.sanity_checking = False
            t._metrics = metrics
            restore_rng_state(rng)

    def run_epoch(self, start: int = 0) -> bool:
        """One training epoch from batch ``start``; returns True when the epoch ran to its end."""
        t, hooks, module, feed = self.t, self.hooks, self.t.module, self.train_feed
        epoch = self.epoch
        t.num_training_batches = feed.num_batches
        self.val_every = t.val_every_batches(feed.num_batches)
        self.plan = t.accumulation.plan(epoch, feed.num_batches)
        module.train()
        t._metrics.start_stage("train")
        self.epoch_finished = False
        with t._metrics.epoch_level():
            hooks.both("on_train_epoch_start")
        if start and self.validation_pending_at(start):
            self.run_validation()  # the saved run checkpointed just before this validation point

        step, plan = self.step.__call__, self.plan  # a bound method calls faster than an instance
        transfer = self.transfer if self.transfer.needed else None
        if t.profiling:  # Lightning's action names; with no profiler the step is called directly
            step = _profiled(t.profiler, "run_training_batch", step)
        batch_start, batch_end = hooks.overridden("on_train_batch_start"), hooks.bound("on_train_batch_end")
        check_placement = t.fit_guard.epoch_start()  # every parameter now, then one per batch (no host sync)
        completed, ended_by_hook = True, False
        epoch_schedulers = module.automatic_optimization and any(
            c.interval == "epoch" and not c.needs_metric for c in t.lr_scheduler_configs)
        metrics = t._metrics
        batch_idx = start - 1
        for batch_idx, batch, is_last in feed.epoch_batches(epoch, start):
            check_placement()
            self.batch_idx = batch_idx
            if transfer is not None:
                batch = transfer(batch, 0)
            metrics.on_batch_start(batch)  # its size weights this batch's epoch means (inferred lazily)
            if batch_start:
                hooks.callbacks("on_train_batch_start", batch, batch_idx)
                if hooks.module_hook("on_train_batch_start", batch, batch_idx) == -1:
                    ended_by_hook = True  # Lightning: -1 ends the epoch before this batch
                    batch_idx -= 1
                    break
            outputs = step(batch, batch_idx, is_last, plan)
            self.batches_done = batch_idx + 1
            if is_last and epoch_schedulers:  # Lightning's point: before the last batch's end hooks and validation
                step_schedulers(t.lr_scheduler_configs, "epoch", epoch + 1, None, hooks=hooks, plateau=False)
            if batch_end is not None:
                batch_end(outputs, batch, batch_idx)
            metrics.on_batch_end()
            if self.val_every and (batch_idx + 1) % self.val_every == 0 and not is_last:
                self.run_validation()
            if (t.should_stop and self.minimum_reached()) or 0 <= t.max_steps <= self.global_step:
                completed = is_last
                break
        self.batches_done = batch_idx + 1
        metrics.epoch_end_reached()

        if completed and not ended_by_hook and self.should_validate_at_epoch_end():
            self.run_validation()
        self.epoch_finished = completed
        with t._metrics.epoch_level():
            hooks.callbacks("on_train_epoch_end")
            hooks.module_hook("on_train_epoch_end")
        t.metric_logging.flush_epoch()
        if completed and module.automatic_optimization:  # plateau schedulers see the epoch's metrics
            step_schedulers(t.lr_scheduler_configs, "epoch", epoch + 1, t.callback_metrics, hooks=hooks,
                            plateau=True)
        with t._metrics.epoch_level():
            t.callback_list.on_train_epoch_end_monitoring(t, module)
        if t._metrics.has_pending():  # a callback logged through module.log
            t.metric_logging.log(t._metrics.reduce_epoch())
        t._metrics.end_stage()
        return completed

    # ---- steps and validation ----------------------------------------------------------------------------
    def after_optimizer_step(self, stepped: bool, schedulers: bool = True) -> None:
        t = self.t
        self.global_step += 1
        if not stepped:
            self.skipped_steps += 1
        if schedulers and t.lr_scheduler_configs:
            step_schedulers(t.lr_scheduler_configs, "step", self.global_step, skipped=not stepped, hooks=self.hooks)
        t.metric_logging.log_step(self.global_step)

    def should_validate_at_epoch_end(self) -> bool:
        t = self.t
        if not self.val_feeds:
            return False
        every = t.check_val_every_n_epoch
        if every is None or (self.epoch + 1) % every:
            return False
        # An int/fractional val_check_interval validates at its multiples only (as in Lightning).
        return self.val_every is None or self.batches_done % self.val_every == 0

    def run_validation(self) -> None:
        if self.val_feeds:
            with self.t.profiler.profile("run_validation"):
                results = EvaluationLoop(self.t, self.hooks, "validate", self.val_feeds, in_fit=True).run()
            self.t.metric_logging.log_results(results)
            self.validated_at = (self.epoch, self.batches_done)

    def validation_pending_at(self, start: int) -> bool:
        """True when a resumed epoch starts at an in-epoch validation point the saved run had not run yet."""
        pending, self.validation_pending = self.validation_pending, False
        num = self.train_feed.num_batches
        return (pending and bool(self.val_feeds) and self.val_every is not None and start % self.val_every == 0
                and (num is None or start < num))


def _profiled(profiler: Any, action: str, fn: Any) -> Any:
    def run(*args: Any) -> Any:
        with profiler.profile(action):
            return fn(*args)

    return run


def _check_manual_optimization(t: Trainer) -> None:
    """Under manual optimization the step is the user's: Trainer-driven accumulation or clipping would be ignored."""
    from callbacks.gradient_accumulation_scheduler import GradientAccumulationScheduler

    if any(k != 1 for _, k in t.accumulation.schedule) and not isinstance(t.accumulation, GradientAccumulationScheduler):
        raise ValueError(f"accumulate_grad_batches={dict(t.accumulation.schedule)} does nothing under manual "
                         "optimization (automatic_optimization = False): step the optimizer every N batches "
                         "yourself in training_step, or use automatic optimization.")
    if t.gradient_clip_val:
        raise ValueError(f"gradient_clip_val={t.gradient_clip_val} does nothing under manual optimization: call "
                         "self.clip_gradients(optimizer, gradient_clip_val=..., gradient_clip_algorithm=...) in "
                         "training_step before optimizer.step(), or use automatic optimization.")
