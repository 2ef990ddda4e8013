"""One training batch: forward, backward and — at a window's end — the optimizer step, in Lightning's order.

Automatic optimization, per micro-batch::

    [module.optimizer_step(epoch, batch_idx, optimizer, closure)   only at a window's end, when overridden]
      closure: training_step → (window start) on_before_zero_grad, optimizer_zero_grad
               → on_before_backward → backward → on_after_backward
    on_before_optimizer_step → configure_gradient_clipping → optimizer step (precision, skip detection)
    → lr_scheduler_step (step-interval schedulers)

Policy lives in components: the Strategy (placement, sync), the Precision plugin (autocast, scaling,
skip detection), the window plan (GradientAccumulation). Hooks run only when overridden; the path
does no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from framework.precision import NO_CONTEXT

if TYPE_CHECKING:
    from framework.hooks import HookCaller
    from framework.loops.fit import FitLoop
    from framework.trainer import Trainer


class AutomaticStep:
    """The automatic-optimization step for one micro-batch, bound to one fit run."""

    def __init__(self, trainer: Trainer, loop: FitLoop, hooks: HookCaller) -> None:
        self.t, self.loop, self.hooks = trainer, loop, hooks
        self.module = trainer.module
        self.strategy = trainer.strategy
        self.precision = trainer.precision_plugin
        self.optimizers = trainer.optimizers
        self.training_step = hooks.step_function("training_step")
        self.count_items = getattr(type(self.module), "num_items", None) is not None
        self.items: Any = 0
        self.nan_guard = trainer.nan_guard  # None unless nan_policy is "skip"/"stop": then one check per step
        # Which optional hooks run, decided once: an un-overridden hook costs one attribute test per step.
        self.before_backward = hooks.overridden("on_before_backward")
        self.after_backward = hooks.overridden("on_after_backward")
        self.before_optimizer_step = hooks.overridden("on_before_optimizer_step")
        self.before_zero_grad = hooks.overridden("on_before_zero_grad")
        self.custom_optimizer_step = hooks.module_overrides("optimizer_step")
        self.custom_zero_grad = hooks.module_overrides("optimizer_zero_grad")
        self.custom_backward = hooks.module_overrides("backward")
        self.custom_clipping = hooks.module_overrides("configure_gradient_clipping")
        self.fit_guard = trainer.fit_guard
        self.plain_window = self.nan_guard is None and not self.count_items
        # Nothing optional in the way: one micro-batch per window takes plain_step (see there).
        self.plain = self.plain_window and not (
            self.before_backward or self.after_backward or self.before_optimizer_step or self.before_zero_grad
            or self.custom_optimizer_step or self.custom_zero_grad or self.custom_backward or self.custom_clipping)
        # With a strategy and precision plugin that add nothing to a step, the plain step makes the calls itself.
        self.run_plain = (self.direct_step if self.plain and self.strategy.adds_nothing_to_steps
                          else self.plain_step)
        self.wrapped = [KilnOptimizer(opt, self) for opt in self.optimizers]
        self.window_open = False
        self.window_ready: bool | None = None
        self.stepped = True
        self.norms: list[torch.Tensor] = []
        for optimizer in self.optimizers:  # a window cut short by a stop in an earlier fit is not carried over
            self.strategy.zero_grad(optimizer)

    def __call__(self, batch: Any, batch_idx: int, is_last: bool, plan: Any) -> Any:
        if plan.k == 1:
            if self.plain and not self.t.gradient_clip_val:
                return self.run_plain(batch, batch_idx)
            sync, divisor = True, 1
        else:
            sync, divisor = plan.window(batch_idx, is_last)
        self.t.sync_gradients = sync
        if not sync:
            return self.forward_backward(batch, batch_idx, divisor, sync)
        if self.custom_optimizer_step:
            closure = Closure(self, batch, batch_idx, divisor)
            for optimizer in self.wrapped:
                self.module.optimizer_step(self.loop.epoch, batch_idx, optimizer, closure)
            if not closure.ran:
                raise RuntimeError(f"{type(self.module).__name__}.optimizer_step() did not run the closure it was "
                                   "given, so training_step and backward never ran for this batch; call "
                                   "optimizer.step(closure=optimizer_closure) or optimizer_closure() in it.")
            output = closure.output
        else:
            output = self.forward_backward(batch, batch_idx, divisor, sync)
            for optimizer in self.optimizers:  # what KilnOptimizer.step() does without a closure
                self.step_optimizer(optimizer)
        self.end_window(batch_idx, plan)
        return output

    def plain_step(self, batch: Any, batch_idx: int) -> Any:
        """``__call__`` when every optional part is off — no hook among the step's, no clipping, no nan policy,
        no accumulation: forward, zero_grad, backward, step, in the general path's order without its tests
        (``tests/test_step_paths.py`` checks both paths give the same run)."""
        t, strategy, optimizers = self.t, self.strategy, self.optimizers
        t.sync_gradients = True
        context = strategy.no_sync(False)
        if context is not NO_CONTEXT:  # a strategy that wants a context around a synchronising micro-batch
            with context:
                output = self._forward_backward(batch, batch_idx, 1)
        else:
            output = self._training_step(batch, batch_idx)
            loss = loss_from_output(output)
            if loss is not None:
                t.last_loss = loss.detach()
            for optimizer in optimizers:
                strategy.zero_grad(optimizer)
            if loss is not None:
                strategy.backward(loss)
        self.window_open, self.window_ready = False, True
        guard, stepped = self.fit_guard, True
        for optimizer in optimizers:
            guard.stepping = True  # this step is the Trainer's own, not a hand-called optimizer.step()
            stepped = strategy.optimizer_step(optimizer) and stepped
            guard.stepping = False
        self.window_ready = None
        self.precision.finish_step()
        self.loop.after_optimizer_step(stepped)
        return output

    def direct_step(self, batch: Any, batch_idx: int) -> Any:
        """``plain_step`` when the strategy and precision plugin add nothing to it (``adds_nothing_to_steps``):
        the same calls on the optimizers and the loss, without the layers that would only pass them on."""
        t = self.t
        t.sync_gradients = True
        output = self.training_step(batch, batch_idx)
        loss = loss_from_output(output)
        if loss is not None:
            t.last_loss = loss.detach()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
        self.window_open, self.window_ready = False, True
        guard = self.fit_guard
        for optimizer in self.optimizers:
            guard.stepping = True  # this step is the Trainer's own, not a hand-called optimizer.step()
            optimizer.step()
            guard.stepping = False
        self.window_ready = None
        self.loop.after_optimizer_step(True)
        return output

    def forward_backward(self, batch: Any, batch_idx: int, divisor: int, sync: bool) -> Any:
        """training_step and backward for one micro-batch (gradients are not synchronised inside a window)."""
        context = self.strategy.no_sync(not sync)
        if context is NO_CONTEXT:
            return self._forward_backward(batch, batch_idx, divisor)
        with context:
            return self._forward_backward(batch, batch_idx, divisor)

    def _training_step(self, batch: Any, batch_idx: int) -> Any:
        """``training_step`` inside the precision plugin's forward context (not entered when it does nothing)."""
        context = self.precision.forward_context()
        if context is NO_CONTEXT:
            return self.training_step(batch, batch_idx)
        with context:
            return self.training_step(batch, batch_idx)

    def _forward_backward(self, batch: Any, batch_idx: int, divisor: int) -> Any:
        output = self._training_step(batch, batch_idx)
        loss = loss_from_output(output)
        if loss is not None:
            self.t.last_loss = loss.detach()
            if self.nan_guard is not None:
                self.nan_guard.observe(loss)
            if self.count_items:
                self.items = self.items + self.module.num_items(batch)
            elif divisor != 1:
                loss = loss / divisor
        if not self.window_open:
            self.window_open = True
            self.zero_grad(batch_idx)
        if loss is not None:
            if self.before_backward:
                self.hooks.both("on_before_backward", loss)
            if self.custom_backward:
                self.strategy.backward(loss, backward_fn=self.module.backward)  # gets the scaled loss
            else:
                self.strategy.backward(loss)
            if self.after_backward:
                self.hooks.both("on_after_backward")
        return output

    def zero_grad(self, batch_idx: int) -> None:
        """Gradients are cleared as a window opens (Lightning's point: after training_step, before backward)."""
        for optimizer in self.optimizers:
            if self.before_zero_grad:
                self.hooks.both("on_before_zero_grad", optimizer)
            if self.custom_zero_grad:
                self.module.optimizer_zero_grad(self.loop.epoch, batch_idx, optimizer)
            else:
                self.strategy.zero_grad(optimizer)

    def prepare_window_step(self, plan: Any, batch_idx: int) -> bool:
        """Once per window end, before the first optimizer steps: the nan policy, then gradient rescaling."""
        if self.window_ready is not None:
            return self.window_ready
        self.window_ready = True
        if self.nan_guard is not None and self.nan_guard.step_is_bad(self.t):
            self.window_ready = False
            return False
        factor = None
        if self.count_items:
            total = torch.as_tensor(self.items, dtype=torch.float64, device=self.strategy.root_device)
            total = self.strategy.all_reduce(total, "sum")
            factor = self.strategy.world_size / total.clamp_min(1)
        elif plan.k > 1:
            factor = plan.tail_correction(batch_idx)
        if factor is not None:
            self.strategy.scale_gradients(self.optimizers, factor)
        return True

    def step_optimizer(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        """Hooks, clipping and the step of one optimizer, on true (unscaled) gradients; ``kwargs`` go to its step."""
        ready = self.window_ready
        if ready is None:
            if self.plain_window and self.loop.plan.k == 1:  # nothing to check or rescale
                ready = self.window_ready = True
            else:
                ready = self.prepare_window_step(self.loop.plan, self.loop.batch_idx)
        if not ready:
            return
        t = self.t
        if self.before_optimizer_step:
            self.precision.unscale_gradients(optimizer)
            self.hooks.both("on_before_optimizer_step", optimizer)
        if self.custom_clipping:
            self.precision.unscale_gradients(optimizer)
            self.module.configure_gradient_clipping(optimizer, t.gradient_clip_val, t.gradient_clip_algorithm)
        elif t.gradient_clip_val:
            norm = self.strategy.clip_gradients(optimizer, t.gradient_clip_val, t.gradient_clip_algorithm)
            if norm is not None:
                self.norms.append(norm)
        guard = self.fit_guard
        guard.stepping = True  # this step is the Trainer's own, not a hand-called optimizer.step()
        self.stepped = self.strategy.optimizer_step(optimizer, **kwargs) and self.stepped
        guard.stepping = False

    def end_window(self, batch_idx: int, plan: Any) -> None:
        stepped = self.stepped and bool(self.window_ready)
        self.window_open, self.window_ready, self.stepped = False, None, True
        if self.count_items:
            self.items = 0
        self.precision.finish_step()
        norms = self.norms
        if norms:
            self.norms = []
            self.t.grad_norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(
                [n.to(norms[0]) for n in norms]))
        self.loop.after_optimizer_step(stepped)


class Closure:
    """What ``optimizer_step`` overrides receive: runs the batch's forward and backward once, returns the loss."""

    def __init__(self, step: AutomaticStep, batch: Any, batch_idx: int, divisor: int) -> None:
        self.step, self.batch, self.batch_idx, self.divisor = step, batch, batch_idx, divisor
        self.ran = False
        self.output: Any = None

    def __call__(self) -> torch.Tensor | None:
        if not self.ran:
            self.ran = True
            self.output = self.step.forward_backward(self.batch, self.batch_idx, self.divisor, True)
        loss = loss_from_output(self.output) if self.output is not None else None
        return None if loss is None else loss.detach()


class KilnOptimizer:
    """The optimizer that ``optimizer_step`` overrides and ``self.optimizers()`` see (Lightning's
    LightningOptimizer): ``step(closure)`` runs the closure, then steps through the strategy and precision
    plugin (loss scaling, fp16 skip detection, clipping, hooks). Everything else is the wrapped optimizer's.

    Under manual optimization the closure reaches ``torch.optim.Optimizer.step(closure=...)`` (wrapped so that
    ``on_before_optimizer_step`` sees its gradients), so closure optimizers such as LBFGS re-evaluate it; extra
    keyword arguments reach the optimizer's ``step`` in both modes, as in Lightning."""

    def __init__(self, optimizer: torch.optim.Optimizer, step: AutomaticStep | None = None,
                 trainer: Trainer | None = None) -> None:
        self.optimizer = optimizer
        self._step = step
        self._trainer = trainer

    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        if self._step is None:
            return manual_step(self._trainer, self.optimizer, closure, **kwargs)
        # Automatic optimization: the closure is the batch's forward/backward, run once before the step.
        result = closure() if closure is not None else None
        self._step.step_optimizer(self.optimizer, **kwargs)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @contextmanager
    def toggle_model(self, sync_grad: bool = True) -> Iterator[None]:
        """Lightning's helper for manual optimization: inside the block only this optimizer's parameters require
        grad (``toggle_optimizer``), and with ``sync_grad=False`` a backward does not synchronise gradients across
        processes (accumulate locally; make the last backward before ``step()`` with ``sync_grad=True``)."""
        trainer = self._trainer if self._trainer is not None else self._step.t
        strategy, module = trainer.strategy, trainer.module
        with strategy.no_sync(not sync_grad):
            module.toggle_optimizer(self)
            try:
                yield
            finally:
                module.untoggle_optimizer(self)
        strategy.no_sync(False)  # backward outside the block synchronises again

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"KilnOptimizer({self.optimizer!r})"


def manual_step(t: Trainer, optimizer: torch.optim.Optimizer, closure: Any = None, **kwargs: Any) -> Any:
    """A step under manual optimization: hooks and the step on true gradients; counted in global_step (clipping is
    the user's call there: ``self.clip_gradients``). Returns what the closure returned (None without one).

    LR schedulers are not stepped: in manual optimization that is the user's call (``self.lr_schedulers()``).
    """
    def before_step() -> None:
        t.precision_plugin.unscale_gradients(optimizer)
        t.hooks.both("on_before_optimizer_step", optimizer)

    if closure is None:
        before_step()
        stepped = t.strategy.optimizer_step(optimizer, **kwargs)
        t.fit_loop.after_optimizer_step(stepped, schedulers=False)
        return None
    results: list[Any] = []

    def wrapped() -> Any:  # what optimizer.step(closure=...) calls (LBFGS: several times)
        results.append(closure())
        before_step()
        return results[-1]

    stepped = t.strategy.optimizer_step(optimizer, closure=wrapped, **kwargs)
    t.fit_loop.after_optimizer_step(stepped, schedulers=False)
    return results[-1] if results else None


class ManualStep:
    """Manual optimization: the user's training_step does backward and steps itself."""

    def __init__(self, trainer: Trainer, hooks: HookCaller) -> None:
        self.t = trainer
        self.training_step = hooks.step_function("training_step")

    def __call__(self, batch: Any, batch_idx: int, is_last: bool, plan: Any) -> Any:
        t = self.t
        t.sync_gradients = True
        with t.precision_plugin.forward_context():
            output = self.training_step(batch, batch_idx)
        t.precision_plugin.finish_step()  # the optimizers stepped in training_step share one scale update
        if isinstance(output, torch.Tensor):
            t.last_loss = output.detach()
        elif isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
            t.last_loss = output["loss"].detach()
        return output


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
