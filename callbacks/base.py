"""The Callback base: every hook the Trainer calls, all no-ops by default.

Hook names and arguments match Lightning's so that porting a callback is a rename. The Trainer only
dispatches hooks a callback actually overrides, so an unused hook costs nothing per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from framework.module import TrainModule
    from framework.trainer import Trainer


class Callback:
    """Base class for Trainer callbacks.

    Subclasses override the hooks they need. ``state_dict``/``load_state_dict`` are stored in
    checkpoints under ``state_key`` (the class name by default; make it unique when the same callback
    class is installed twice with different settings).
    """

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    # ---- lifecycle -------------------------------------------------------------------------
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None: ...
    def teardown(self, trainer: Trainer, module: TrainModule, stage: str) -> None: ...
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_fit_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None: ...

    # ---- training --------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_train_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int) -> None: ...
    def on_train_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None: ...
    def on_before_backward(self, trainer: Trainer, module: TrainModule, loss: torch.Tensor) -> None: ...
    def on_after_backward(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_before_optimizer_step(
        self, trainer: Trainer, module: TrainModule, optimizer: torch.optim.Optimizer
    ) -> None: ...

    # ---- validation ------------------------------------------------------------------------
    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_validation_epoch_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_validation_epoch_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_validation_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int
    ) -> None: ...
    def on_validation_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None: ...

    # ---- test ------------------------------------------------------------------------------
    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_test_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_test_epoch_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_test_epoch_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_test_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int) -> None: ...
    def on_test_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None: ...

    # ---- predict ---------------------------------------------------------------------------
    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_predict_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_predict_epoch_start(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_predict_epoch_end(self, trainer: Trainer, module: TrainModule) -> None: ...
    def on_predict_batch_start(
        self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int
    ) -> None: ...
    def on_predict_batch_end(
        self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None: ...

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, module: TrainModule, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, trainer: Trainer, module: TrainModule, checkpoint: dict[str, Any]) -> None: ...

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
            base = getattr(Callback, name)
            bound = tuple(
                getattr(cb, name) for cb in self.callbacks if getattr(type(cb), name, base) is not base
            )
            setattr(self, name, _Dispatch(bound))

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
