"""The TrainModule's hook set: Lightning's module and data hooks, with Lightning's names and signatures.

Every hook is a no-op (or Lightning's default behaviour) here; the loops call a hook only when the
module overrides it — in its class or on the instance — so an unused hook costs nothing per step.
The defaults that do something (``optimizer_step``, ``optimizer_zero_grad``, ``backward``,
``lr_scheduler_step``, ``configure_gradient_clipping``, ``transfer_batch_to_device``) go through the
Trainer's strategy and precision plugin, so overriding them keeps Kiln's numerics (loss scaling,
fp16 skip detection, exact accumulation windows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from framework.hooks import Callback


class ModuleHooks:
    """Lifecycle, batch, optimization and checkpoint hooks of a TrainModule (Lightning's ModelHooks)."""

    # ---- lifecycle --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Called on every process at the start of fit/validate/test/predict, before the model is wrapped."""

    def teardown(self, stage: str) -> None:
        """Called on every process at the end of fit/validate/test/predict."""

    def prepare_data(self) -> None:
        """Download or write data once per node (local rank 0), before ``setup`` (Lightning's semantics)."""

    def configure_callbacks(self) -> Callback | list[Callback]:
        """Callbacks the module brings; they replace Trainer callbacks of the same type."""
        return []

    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...

    # ---- epochs and batches -------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Return -1 to end the current epoch before this batch (Lightning's semantics)."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...

    def on_validation_model_zero_grad(self) -> None:
        """Before validation inside fit: gradients are released (set to None) so evaluation has the memory."""
        trainer = getattr(self, "_trainer", None)
        for optimizer in (trainer.optimizers if trainer is not None else []):
            trainer.strategy.zero_grad(optimizer)

    def on_validation_model_eval(self) -> None:
        self.eval()  # type: ignore[attr-defined]

    def on_validation_model_train(self) -> None:
        """After validation inside fit; Kiln restores each submodule's own train/eval flag before this runs."""

    def on_test_model_eval(self) -> None:
        self.eval()  # type: ignore[attr-defined]

    def on_test_model_train(self) -> None: ...

    def on_predict_model_eval(self) -> None:
        self.eval()  # type: ignore[attr-defined]

    # ---- optimization --------------------------------------------------------------------------------
    def on_before_backward(self, loss: torch.Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...
    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None: ...

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Backpropagate ``loss`` (already scaled by the precision plugin, as in Lightning)."""
        loss.backward(*args, **kwargs)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step ``optimizer`` (Kiln's wrapper: precision, skip detection and clipping apply) after running the
        closure (the batch's forward and backward). Override to add warm-up or conditional steps."""
        optimizer.step(closure=optimizer_closure)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip before each optimizer step; by default with the Trainer's gradient_clip_val/algorithm."""
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)  # type: ignore[attr-defined]

    # ---- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read or add to the checkpoint dict (added keys are stored as data: tensors, numbers, strings, ...)."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...


class DataHooks:
    """Batch hooks shared by TrainModule and DataModule (Lightning's DataHooks); ``framework.batch_transfer``
    picks whose run (the DataModule's when it overrides them)."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Alter the batch before it is moved to the device (CPU augmentations)."""
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move ``batch`` to ``device``; override for custom batch types (the default moves tensors inside
        dicts, lists, tuples, namedtuples, dataclasses and anything with ``.to``)."""
        from framework.batch_transfer import move_data_to_device

        return move_data_to_device(batch, device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Alter the batch after it was moved to the device (device augmentations)."""
        return batch
