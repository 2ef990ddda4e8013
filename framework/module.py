"""TrainModule: the user's model plus the step hooks the Trainer calls.

A TrainModule is an ``nn.Module``; the Trainer attaches itself while running so ``self.log``,
``self.global_step`` and manual optimization work. Nothing here knows about strategies or devices:
the Trainer and its Strategy do the placement, wrapping and numerics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from framework.trainer import Trainer


class TrainModule(nn.Module):
    """Subclass and implement ``training_step`` and ``configure_optimizers`` (see DESIGN.md §2).

    Set ``automatic_optimization = False`` to drive optimizers yourself with ``self.optimizers()``,
    ``self.manual_backward(loss)`` and ``opt.step()``; precision (loss scaling, fp16 skip detection) is
    still applied through the wrapped optimizers.
    """

    automatic_optimization: bool = True

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_trainer", None)

    # ---- steps (override) --------------------------------------------------------------------
    # training_step(batch, batch_idx) and configure_optimizers() are required for fit; they are not
    # defined here so that the Trainer can say exactly which one is missing.

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        """Optional; validation is skipped when not overridden."""

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        """Optional; needed by ``trainer.test``."""

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Defaults to ``self(batch)``; ``dataloader_idx`` is passed when predicting over several loaders."""
        return self(batch)

    def configure_model(self) -> None:
        """Build layers lazily here (meta device / sharded init); called once before wrapping."""

    @property
    def device_mesh(self) -> Any:
        """The strategy's ``DeviceMesh`` while a Trainer runs (``model_parallel``: dims ``"data_parallel"`` x
        ``"tensor_parallel"``, ready in ``configure_model``); None without one."""
        trainer = self._trainer
        return getattr(trainer.strategy, "device_mesh", None) if trainer is not None else None

    # ---- optional data hooks -----------------------------------------------------------------
    # train_dataloader / val_dataloader / test_dataloader / predict_dataloader are looked up by name
    # when fit/validate/test/predict get no loaders; they are not defined here so "not overridden"
    # is simply "not present".

    # ---- lifecycle hooks (no-ops) --------------------------------------------------------------
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_before_backward(self, loss: torch.Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...

    # ---- logging ---------------------------------------------------------------------------------
    def log(self, name: str, value: Any, *, on_step: bool | None = None, on_epoch: bool | None = None,
            prog_bar: bool = False, sync_dist: bool = False, reduce_fx: str = "mean",
            batch_size: int | None = None) -> None:
        """Record a metric. Training default: a step value; validation/test default: the epoch mean."""
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError(f"self.log({name!r}, ...) was called outside a Trainer run; attach the module by "
                               "calling trainer.fit/validate/test first.")
        trainer._metrics.log(name, value, on_step, on_epoch, prog_bar, sync_dist, reduce_fx, batch_size)

    def log_dict(self, values: Mapping[str, Any], **kwargs: Any) -> None:
        """``self.log`` for every item of ``values`` with the same options."""
        for name, value in values.items():
            self.log(name, value, **kwargs)

    # ---- trainer-backed properties -------------------------------------------------------------------
    @property
    def trainer(self) -> Trainer:
        if self._trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer; call trainer.fit(module) first.")
        return self._trainer

    @property
    def device(self) -> torch.device:
        if self._trainer is not None:
            return self._trainer.strategy.root_device
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def global_step(self) -> int:
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def current_epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer is not None else 0

    # ---- manual optimization ------------------------------------------------------------------------
    def optimizers(self) -> Any:
        """The Trainer's optimizers, wrapped so ``step()`` honours precision; one optimizer is returned bare."""
        wrapped = self.trainer._manual_optimizers
        return wrapped[0] if len(wrapped) == 1 else wrapped

    def lr_schedulers(self) -> Any:
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else schedulers

    def manual_backward(self, loss: torch.Tensor) -> None:
        """Backward through the strategy and precision (loss scaling, DeepSpeed engine, ...)."""
        trainer = self.trainer
        trainer._call_hooks("on_before_backward", loss)
        trainer.strategy.backward(loss)
        trainer._call_hooks("on_after_backward")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_trainer"] = None
        return state
