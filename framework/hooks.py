"""Hooks: the Callback base, callback dispatch, and calling hooks on callbacks and the module together.

Hook names and arguments match Lightning's so that porting a callback is a rename. Only hooks that
a callback or the module actually overrides are called, so an unused hook costs nothing per step.
The order of each call site (callbacks first or module first) is Lightning's; the loops choose it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from framework.module import TrainModule
    from framework.trainer import Trainer


class Callback:
    """Base class for Trainer callbacks.

    Subclasses override the hooks they need. ``state_dict``/``load_state_dict`` are stored in
    checkpoints under ``state_key`` (the class name by default; make it unique when the same callback
    class is installed twice with different settings). ``per_rank_state = True`` stores the state once
    per rank instead of once per run (RNG states, data positions).
    """

    per_rank_state: bool = False

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    def _generate_state_key(self, **kwargs: Any) -> str:
        """A state key that tells apart two instances of one class configured differently (Lightning's helper)."""
        return f"{type(self).__qualname__}{kwargs!r}"

    # ---- lifecycle -------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: TrainModule, stage: str) -> None: ...
    def teardown(self, trainer: Trainer, pl_module: TrainModule, stage: str) -> None: ...
    def on_fit_start(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_fit_end(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_sanity_check_start(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_sanity_check_end(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_exception(self, trainer: Trainer, pl_module: TrainModule, exception: BaseException) -> None: ...

    # ---- training --------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_train_end(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_train_epoch_start(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_train_epoch_end(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_train_batch_start(self, trainer: Trainer, pl_module: TrainModule, batch: Any, batch_idx: int) -> None: ...
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None: ...
    def on_before_backward(self, trainer: Trainer, pl_module: TrainModule, loss: torch.Tensor) -> None: ...
    def on_after_backward(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: TrainModule, optimizer: torch.optim.Optimizer
    ) -> None: ...
    def on_before_zero_grad(
        self, trainer: Trainer, pl_module: TrainModule, optimizer: torch.optim.Optimizer
    ) -> None: ...

    # ---- validation / test / predict -------------------------------------------------------
    def on_validation_start(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_validation_end(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: TrainModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None: ...
    def on_test_start(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_test_end(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_test_epoch_start(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_test_epoch_end(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_test_batch_start(
        self, trainer: Trainer, pl_module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_test_batch_end(
        self, trainer: Trainer, pl_module: TrainModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None: ...
    def on_predict_start(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_predict_end(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: TrainModule) -> None: ...
    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: TrainModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None: ...
    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: TrainModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None: ...

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: TrainModule, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, trainer: Trainer, pl_module: TrainModule, checkpoint: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints (plain values and tensors only: checkpoints never pickle)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


HOOK_NAMES: tuple[str, ...] = tuple(
    name for name in vars(Callback) if name.startswith("on_") or name in ("setup", "teardown")
)


class CallbackList:
    """Dispatches hooks to callbacks in list order, skipping callbacks that don't override a hook.

    ``callbacks.hook_name(trainer, module, ...)`` calls every override in order. Resolution happens
    once, at construction, so per-step dispatch of an unused hook is an empty-tuple loop.
    """

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)
        for name in HOOK_NAMES:
            bound = tuple(getattr(cb, name) for cb in self.callbacks if overrides(cb, name, Callback))
            setattr(self, name, _Dispatch(bound))
        # Lightning runs the monitoring callbacks' on_train_epoch_end after the module's, so that they see
        # what the module logged there; every other callback runs before the module.
        monitoring = _monitoring_types()
        name = "on_train_epoch_end"
        self.on_train_epoch_end = _Dispatch(tuple(
            getattr(cb, name) for cb in self.callbacks
            if overrides(cb, name, Callback) and not isinstance(cb, monitoring)))
        self.on_train_epoch_end_monitoring = _Dispatch(tuple(
            getattr(cb, name) for cb in self.callbacks if overrides(cb, name, Callback) and isinstance(cb, monitoring)))

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)


class _Dispatch:
    __slots__ = ("hooks",)

    def __init__(self, hooks: tuple) -> None:
        self.hooks = hooks

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def __call__(self, *args: Any) -> None:
        for hook in self.hooks:
            hook(*args)


def _monitoring_types() -> tuple[type, ...]:
    from callbacks.checkpoint import ModelCheckpoint
    from callbacks.early_stopping import EarlyStopping

    return (ModelCheckpoint, EarlyStopping)


def overrides(obj: Any, name: str, base: type) -> bool:
    """True when ``obj`` replaces ``base.name``: in its class, or on the instance itself (Lightning dispatches
    hooks assigned to an instance too)."""
    if name in getattr(obj, "__dict__", {}):
        return True
    default = getattr(base, name, None)
    return getattr(type(obj), name, default) is not default


def merge_configured_callbacks(callbacks: list[Callback], from_module: Any) -> list[Callback]:
    """``configure_callbacks()``'s result joins the Trainer's: a returned callback replaces every Trainer
    callback of the same type (as in Lightning), and checkpoint callbacks stay last so they see everything the
    other callbacks logged."""
    if from_module is None:
        return callbacks
    extra = [from_module] if isinstance(from_module, Callback) else list(from_module)
    for cb in extra:
        if not isinstance(cb, Callback):
            raise TypeError(f"configure_callbacks() returned {cb!r} ({type(cb).__name__}), which is not a "
                            "callbacks.Callback; return a Callback or a list of them.")
    if not extra:
        return callbacks
    replaced = {type(cb) for cb in extra}
    kept = [cb for cb in callbacks if type(cb) not in replaced]
    return checkpoints_last(kept + extra)


def checkpoints_last(callbacks: list[Callback]) -> list[Callback]:
    """Lightning's order: ModelCheckpoint callbacks run after every other callback (their order kept), so a
    checkpoint holds the state other callbacks (EarlyStopping...) updated in the same hook."""
    from callbacks.checkpoint import ModelCheckpoint

    return [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)] + [
        cb for cb in callbacks if isinstance(cb, ModelCheckpoint)]


class HookCaller:
    """Calls hooks on the callbacks, the module and the DataModule of one run, only where overridden.

    ``both(name, ...)`` runs callbacks first, then the module — Lightning's order for nearly every hook;
    the loops call ``module``/``callbacks`` directly where Lightning's order differs.
    """

    def __init__(self, trainer: Trainer, module: TrainModule, callbacks: CallbackList, datamodule: Any = None) -> None:
        from framework.module_hooks import ModuleHooks

        self.trainer, self.module, self.callback_list, self.datamodule = trainer, module, callbacks, datamodule
        self._module_base = ModuleHooks
        self._module_overridden: dict[str, bool] = {}

    def module_overrides(self, name: str) -> bool:
        known = self._module_overridden.get(name)
        if known is None:
            known = self._module_overridden[name] = overrides(self.module, name, self._module_base)
        return known

    def overridden(self, name: str) -> bool:
        """True when any callback or the module overrides ``name`` (the loop skips the call otherwise)."""
        return bool(getattr(self.callback_list, name, None)) or self.module_overrides(name)

    def callbacks(self, name: str, *args: Any) -> None:
        dispatch = getattr(self.callback_list, name)
        if dispatch:
            # self.log inside the hook gets that hook's defaults and refusals (Lightning's per-hook rules).
            metrics = self.trainer._metrics
            previous, metrics.current_fx = metrics.current_fx, name
            try:
                dispatch(self.trainer, self.module, *args)
            finally:
                metrics.current_fx = previous

    def module_hook(self, name: str, *args: Any) -> Any:
        if not self.module_overrides(name):
            return None
        metrics = self.trainer._metrics
        previous, metrics.current_fx = metrics.current_fx, name
        try:
            return getattr(self.module, name)(*args)
        finally:
            metrics.current_fx = previous

    def both(self, name: str, *args: Any) -> Any:
        """Callbacks, then the module; returns the module hook's result."""
        self.callbacks(name, *args)
        return self.module_hook(name, *args)

    def bound(self, name: str) -> Callable[..., Any] | None:
        """``both(name, ...)`` bound once for a per-batch call site; None when nothing overrides ``name``."""
        callback_hooks = getattr(self.callback_list, name).hooks
        module_hook = getattr(self.module, name) if self.module_overrides(name) else None
        if not callback_hooks and module_hook is None:
            return None
        trainer, module = self.trainer, self.module

        def call(*args: Any) -> Any:
            metrics = trainer._metrics
            previous, metrics.current_fx = metrics.current_fx, name
            try:
                for hook in callback_hooks:
                    hook(trainer, module, *args)
                return None if module_hook is None else module_hook(*args)
            finally:
                metrics.current_fx = previous

        return call

    def datamodule_hook(self, name: str, *args: Any) -> Any:
        if self.datamodule is not None and hasattr(self.datamodule, name):
            return getattr(self.datamodule, name)(*args)
        return None

    def step_function(self, name: str) -> Any:
        """The strategy's callable for a step (DDP/FSDP forward through their wrappers), bound once per run.

        A step defined without ``batch_idx`` (``training_step(self, batch)``, allowed by Lightning) is called
        without it."""
        from framework.module_utils import step_takes_batch_idx

        step = self.trainer.strategy.step_function(name)
        if step_takes_batch_idx(getattr(self.module, name)):
            return step
        return lambda batch, batch_idx, *extra: step(batch, *extra)
