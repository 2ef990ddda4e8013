"""StochasticWeightAveraging (SWA): average the weights of the last epochs, with torch.optim.swa_utils.

Lightning's arguments and schedule: from epoch ``swa_epoch_start`` the optimizer's scheduler is replaced by
``SWALR`` (annealing to ``swa_lrs``), the running average is updated at the start of each epoch up to the
last, and when training ends the module's weights become the average. One difference: batch-norm
statistics for the averaged weights are recomputed with one forward pass over the training data
(``torch.optim.swa_utils.update_bn``: ``module(batch[0])``), not with an extra training epoch, so
``trainer.current_epoch`` is not raised by one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.hooks import Callback

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

_CPU = torch.device("cpu")
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class StochasticWeightAveraging(Callback):
    """``swa_lrs``: the SWA learning rate (one float, or one per param group); ``swa_epoch_start``: an int
    epoch (1-based, as Lightning) or a fraction of ``max_epochs``; ``annealing_epochs``/``annealing_strategy``
    ("cos" or "linear") shape SWALR's ramp; ``avg_fn(averaged, current, num_averaged)`` replaces the equal
    average; ``device`` holds the average (CPU by default, None = the module's device)."""

    def __init__(self, swa_lrs: float | list[float], swa_epoch_start: int | float = 0.8,
                 annealing_epochs: int = 10, annealing_strategy: str = "cos",
                 avg_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 device: torch.device | str | None = _CPU) -> None:
        if isinstance(swa_epoch_start, bool) or not isinstance(swa_epoch_start, (int, float)) or (
                isinstance(swa_epoch_start, int) and swa_epoch_start < 1) or (
                isinstance(swa_epoch_start, float) and not 0 <= swa_epoch_start <= 1):
            raise ValueError(f"`swa_epoch_start` must be an int >= 1 or a float in [0, 1], got {swa_epoch_start!r}.")
        lrs = swa_lrs if isinstance(swa_lrs, list) else [swa_lrs]
        if not lrs or any(isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0 for lr in lrs):
            raise ValueError(f"`swa_lrs` must be a positive float or a list of positive floats, got {swa_lrs!r}.")
        if isinstance(annealing_epochs, bool) or not isinstance(annealing_epochs, int) or annealing_epochs < 1:
            raise ValueError(f"`annealing_epochs` must be an int >= 1, got {annealing_epochs!r}.")
        if annealing_strategy not in ("cos", "linear"):
            raise ValueError(f"`annealing_strategy` must be 'cos' or 'linear', got {annealing_strategy!r}.")
        if avg_fn is not None and not callable(avg_fn):
            raise TypeError(f"`avg_fn` must be callable, got {avg_fn!r}.")
        if device is not None and not isinstance(device, (torch.device, str)):
            raise TypeError(f"`device` must be a torch.device, a str or None, got {device!r}.")
        self._swa_epoch_start = swa_epoch_start
        self._swa_lrs = swa_lrs
        self._annealing_epochs = annealing_epochs
        self._annealing_strategy = annealing_strategy
        self._avg_fn = avg_fn or self.avg_fn
        self._device = device
        self._max_epochs = 0
        self._average: list[torch.Tensor] | None = None  # one tensor per module parameter
        self._swa_scheduler: Any = None
        self._initialized = False
        self.n_averaged: torch.Tensor | None = None
        self._latest_update_epoch = -1
        self._loaded: dict[str, Any] | None = None
        self._steps_itself = False

    @property
    def swa_start(self) -> int:
        """0-based epoch whose start is the first average update."""
        return max(int(self._swa_epoch_start) - 1, 0)

    @property
    def swa_end(self) -> int:
        return self._max_epochs - 1

    @staticmethod
    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        """The equal-weight running mean."""
        return averaged + (current - averaged) / (num_averaged + 1)

    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage == "fit" and type(trainer.strategy).__name__ in _SHARDED:
            raise ValueError(f"StochasticWeightAveraging does not support sharded models "
                             f"({type(trainer.strategy).__name__}); use DDP or a single device.")

    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"StochasticWeightAveraging works with one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}.")
        if len(trainer.lr_scheduler_configs) > 1:
            raise ValueError("StochasticWeightAveraging works with at most one LR scheduler (it replaces it with "
                             "SWALR at swa_epoch_start).")
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0 or max_epochs == float("inf"):
            raise ValueError("StochasticWeightAveraging needs Trainer(max_epochs=N): the average ends at the last "
                             "epoch.")
        self._max_epochs = int(max_epochs)
        if isinstance(self._swa_epoch_start, float):
            self._swa_epoch_start = int(self._max_epochs * self._swa_epoch_start)
        if _has_batch_norm(module) and type(module).forward is nn.Module.forward:
            raise ValueError(f"{type(module).__name__} has batch norm layers, so SWA recomputes their statistics "
                             "with module(batch[0]); define forward() on the module.")
        device = self._device if self._device is not None else next(module.parameters()).device
        self._average = [p.detach().to(device, copy=True) for p in module.parameters()]
        if self._loaded is not None:
            self._restore(trainer)

    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        epoch = trainer.current_epoch
        if not self._initialized and self.swa_start <= epoch <= self.swa_end:
            self._initialized = True
            self._install_swalr(trainer)
        if self.swa_start <= epoch <= self.swa_end and epoch > self._latest_update_epoch:
            self.update_parameters(module)
            self._latest_update_epoch = epoch

    def _install_swalr(self, trainer: Trainer, state: dict[str, Any] | None = None) -> None:
        from torch.optim.swa_utils import SWALR

        from framework.optim import LRSchedulerConfig

        optimizer = trainer.optimizers[0]
        optimizer = getattr(optimizer, "optimizer", optimizer) if not hasattr(optimizer, "param_groups") else optimizer
        lrs = self._swa_lrs if isinstance(self._swa_lrs, list) else [self._swa_lrs] * len(optimizer.param_groups)
        for lr, group in zip(lrs, optimizer.param_groups):
            group["initial_lr"] = lr
        self._swa_scheduler = SWALR(optimizer, swa_lr=lrs, anneal_epochs=self._annealing_epochs,
                                    anneal_strategy=self._annealing_strategy,
                                    last_epoch=self._max_epochs if self._annealing_strategy == "cos" else -1)
        if state:
            self._swa_scheduler.__dict__.update(state)
        # Replacing the user's scheduler keeps the Trainer's scheduler count, so checkpoints resume; without
        # one, SWALR is stepped here at each epoch end instead of being added to the Trainer's list.
        self._steps_itself = not trainer.lr_scheduler_configs
        if not self._steps_itself:
            trainer.lr_scheduler_configs[0] = LRSchedulerConfig(self._swa_scheduler, interval="epoch")
        if self.n_averaged is None:
            self.n_averaged = torch.tensor(0, dtype=torch.long)

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._steps_itself and self._swa_scheduler is not None:
            self._swa_scheduler.step()

    @torch.no_grad()
    def update_parameters(self, module: nn.Module) -> None:
        """Fold the module's current weights into the average."""
        for averaged, param in zip(self._average, module.parameters()):
            current = param.detach().to(averaged.device)
            averaged.copy_(current if self.n_averaged == 0 else
                           self._avg_fn(averaged, current, self.n_averaged.to(averaged.device)))
        self.n_averaged += 1

    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        if self._latest_update_epoch != self.swa_end or self._average is None:
            return  # stopped before the last epoch: the module keeps its trained weights, as in Lightning
        with torch.no_grad():
            for averaged, param in zip(self._average, module.parameters()):
                param.copy_(averaged.to(param.device))
        if _has_batch_norm(module):
            self._update_bn(trainer, module)

    @staticmethod
    def _update_bn(trainer: Trainer, module: nn.Module) -> None:
        from torch.optim.swa_utils import update_bn

        loader = getattr(trainer, "train_dataloader", None)
        if callable(loader) and not hasattr(loader, "__iter__"):
            loader = loader()
        if loader is None:
            raise RuntimeError("StochasticWeightAveraging needs the training dataloader (trainer.train_dataloader) "
                               "to recompute batch-norm statistics.")
        training = module.training
        update_bn(loader, module, device=next(module.parameters()).device)
        module.train(training)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        scheduler = None
        if self._swa_scheduler is not None:
            scheduler = {k: v for k, v in self._swa_scheduler.state_dict().items()
                         if isinstance(v, (int, float, str, bool, list)) and not callable(v)}
        return {
            "n_averaged": 0 if self.n_averaged is None else int(self.n_averaged),
            "latest_update_epoch": self._latest_update_epoch,
            "scheduler_state": scheduler,
            "average_params": None if self._average is None else {str(i): t for i, t in enumerate(self._average)},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

    def _restore(self, trainer: Trainer) -> None:
        state, self._loaded = self._loaded, None
        self._latest_update_epoch = int(state["latest_update_epoch"])
        self.n_averaged = torch.tensor(int(state["n_averaged"]), dtype=torch.long)
        average = state.get("average_params")
        if average:
            for i, tensor in enumerate(self._average):
                tensor.copy_(average[str(i)])
        if state.get("scheduler_state") is not None:
            self._initialized = True
            self._install_swalr(trainer, state["scheduler_state"])
