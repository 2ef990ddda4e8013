"""TrainModule: the user's model plus the step hooks the Trainer calls.

A TrainModule is an ``nn.Module``; the Trainer attaches itself while running so ``self.log``,
``self.global_step`` and manual optimization work. Nothing here knows about strategies or devices:
the Trainer and its Strategy do the placement, wrapping and numerics.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.hparams import HyperparametersMixin
from framework.loading import load_from_checkpoint, restricted_classmethod
from framework.module_hooks import DataHooks, ModuleHooks
from framework.module_utils import ModuleUtilities

if TYPE_CHECKING:
    from framework.trainer import Trainer


class TrainModule(HyperparametersMixin, ModuleUtilities, ModuleHooks, DataHooks, nn.Module):
    """Subclass and implement ``training_step`` and ``configure_optimizers`` (see DESIGN.md §2).

    Set ``automatic_optimization = False`` to drive optimizers yourself with ``self.optimizers()``,
    ``self.manual_backward(loss)`` and ``opt.step()``; precision (loss scaling, fp16 skip detection) is
    still applied through the wrapped optimizers.
    """

    automatic_optimization: bool = True
    CHECKPOINT_HYPER_PARAMS_KEY = "hyper_parameters"
    CHECKPOINT_HYPER_PARAMS_NAME = "hparams_name"
    CHECKPOINT_HYPER_PARAMS_TYPE = "hparams_type"

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

    # ---- logging ---------------------------------------------------------------------------------
    def log(self, name: str, value: Any, prog_bar: bool = False, logger: bool | None = None,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: str | Callable = "mean",
            enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any | None = None,
            add_dataloader_idx: bool = True, batch_size: int | None = None, metric_attribute: str | None = None,
            rank_zero_only: bool = False) -> None:
        """Record a metric, as Lightning's ``LightningModule.log`` (same arguments, defaults and meaning).

        The hook decides the defaults: a step value in training hooks, the epoch mean (weighted by the
        batch size, inferred from the batch unless ``batch_size`` is given) in validation/test hooks and
        in epoch hooks; with both ``on_step`` and ``on_epoch`` the keys get ``_step``/``_epoch`` suffixes.
        """
        trainer = self._trainer
        if type(value) is torch.Tensor and trainer is not None and not logger:  # the hot path
            trainer._metrics.log(name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, enable_graph, sync_dist,
                                 sync_dist_group, add_dataloader_idx, batch_size, metric_attribute, rank_zero_only)
            return
        device = None
        if not isinstance(value, torch.Tensor):
            if isinstance(value, Mapping):
                nested = " (nested dictionaries cannot be logged)" if any(
                    isinstance(v, Mapping) for v in value.values()) else ""
                raise ValueError(f"self.log({name!r}, value=<{type(value).__name__}>){nested}: log one value per "
                                 "name, or use self.log_dict for a dict.")
            if metric_attribute is None and _is_metric(value) and trainer is not None:
                metric_attribute = self._metric_attribute(name, value)
        if trainer is None:
            warnings.warn(f"self.log({name!r}, ...) was called on a module not attached to a Trainer; the value is "
                          "dropped. Run it through trainer.fit/validate/test to record it.", stacklevel=2)
            return
        if logger and not trainer.loggers:
            warnings.warn(f"self.log({name!r}, ..., logger=True) was called but the Trainer has no logger; pass "
                          "Trainer(logger=...) to record it.", stacklevel=2)
        if not isinstance(value, torch.Tensor):
            device = trainer.strategy.root_device
        trainer._metrics.log(name, value, prog_bar, logger, on_step, on_epoch, reduce_fx, enable_graph, sync_dist,
                             sync_dist_group, add_dataloader_idx, batch_size, metric_attribute, rank_zero_only, device)

    def log_dict(self, dictionary: Mapping[str, Any], prog_bar: bool = False, logger: bool | None = None,
                 on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: str | Callable = "mean",
                 enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any | None = None,
                 add_dataloader_idx: bool = True, batch_size: int | None = None, rank_zero_only: bool = False) -> None:
        """``self.log`` for every item of ``dictionary`` (a dict or a torchmetrics.MetricCollection)."""
        if _is_metric_collection(dictionary):
            copy_state = not getattr(dictionary, "_enable_compute_groups", False)
            items = dictionary.items(keep_base=False, copy_state=copy_state)
        else:
            items = dictionary.items()
        for name, value in items:
            self.log(name, value, prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch,
                     reduce_fx=reduce_fx, enable_graph=enable_graph, sync_dist=sync_dist,
                     sync_dist_group=sync_dist_group, add_dataloader_idx=add_dataloader_idx, batch_size=batch_size,
                     rank_zero_only=rank_zero_only)

    def _metric_attribute(self, name: str, metric: Any) -> str:
        """The attribute holding a logged torchmetrics.Metric (needed to restore its state on resume)."""
        found = self.__dict__.get("_kiln_metric_attributes")
        if found is None or id(metric) not in found:
            found = {id(m): attr for attr, m in self.named_modules() if m is not self and _is_metric(m)}
            object.__setattr__(self, "_kiln_metric_attributes", found)
        if id(metric) not in found:
            known = sorted(found.values())
            from framework.exceptions import MisconfigurationException

            hint = f" (one of {known})" if known else ""
            raise MisconfigurationException(
                f"self.log({name!r}, <{type(metric).__name__}>): the metric is not an attribute of "
                f"{type(self).__name__}, so its state could not be checkpointed. Assign it to an attribute in "
                f"__init__, or pass metric_attribute=<name>{hint}.")
        return found[id(metric)]

    # ---- trainer-backed properties -------------------------------------------------------------------
    @property
    def trainer(self) -> Trainer:
        if self._trainer is None and not self._jit_is_scripting:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer; call trainer.fit(module) first.")
        return self._trainer

    @trainer.setter
    def trainer(self, trainer: Trainer | None) -> None:
        for child in self.children():  # nested TrainModules share the Trainer, as in Lightning
            if isinstance(child, TrainModule):
                child.trainer = trainer
        object.__setattr__(self, "_trainer", trainer)

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
    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        """The Trainer's optimizers: one object when there is one, else a list. With ``use_pl_optimizer`` (the
        default) they are wrapped so ``step()`` goes through precision, clipping and the step counter; with
        False the plain ``torch.optim`` objects."""
        opts = self.trainer._manual_optimizers if use_pl_optimizer else self.trainer.optimizers
        return opts[0] if len(opts) == 1 else list(opts)

    def lr_schedulers(self) -> Any:
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else schedulers

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward through the strategy and precision (loss scaling, DeepSpeed engine, ...); ``args``/``kwargs``
        (e.g. ``retain_graph=True``) go on to ``Tensor.backward``. Manual optimization only."""
        if self.automatic_optimization:
            raise RuntimeError("manual_backward() is for manual optimization: set self.automatic_optimization = "
                               "False in __init__, or return the loss from training_step and let the Trainer "
                               "call backward.")
        trainer = self.trainer
        trainer._call_hooks("on_before_backward", loss)
        if trainer.hooks.module_overrides("backward"):
            kwargs["backward_fn"] = self.backward
        trainer.strategy.backward(loss, *args, **kwargs)
        trainer._call_hooks("on_after_backward")

    @restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike, map_location: Any = None,
                             hparams_file: str | os.PathLike | None = None, strict: bool | None = None,
                             **kwargs: Any) -> Any:
        """A new module built from the checkpoint's saved hyperparameters (``kwargs`` override them), with its
        weights loaded (``strict``; default ``self.strict_loading``). ``checkpoint_path`` is a checkpoint
        directory or URL, or ``<dirpath>/last`` / ``<dirpath>/best``. Weights load on the CPU unless
        ``map_location`` names a device. See ``framework.loading``."""
        return load_from_checkpoint(cls, checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                    strict=strict, **kwargs)

    def clip_gradients(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                       gradient_clip_algorithm: str | None = None) -> None:
        """Clip this optimizer's true (unscaled) gradients; None takes the Trainer's setting (Lightning's rule)."""
        trainer = self.trainer
        if gradient_clip_val is None:
            gradient_clip_val = trainer.gradient_clip_val or 0.0
        elif trainer.gradient_clip_val is not None and trainer.gradient_clip_val != gradient_clip_val:
            raise ValueError(f"Trainer(gradient_clip_val={trainer.gradient_clip_val!r}) and clip_gradients("
                             f"gradient_clip_val={gradient_clip_val!r}) disagree; set the value in one place.")
        algorithm = (gradient_clip_algorithm or trainer.gradient_clip_algorithm or "norm").lower()
        if algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not valid; use 'norm' or 'value'.")
        if not gradient_clip_val:
            return
        raw = getattr(optimizer, "optimizer", optimizer)
        trainer.precision_plugin.unscale_gradients(raw)
        trainer.grad_norm = trainer.strategy.clip_gradients(raw, float(gradient_clip_val), algorithm)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_trainer"] = None
        return state



def _is_metric(value: Any) -> bool:
    tm = sys.modules.get("torchmetrics")  # importing torchmetrics costs >1 s: only look when it is loaded
    return tm is not None and isinstance(value, tm.Metric)


def _is_metric_collection(value: Any) -> bool:
    tm = sys.modules.get("torchmetrics")
    return tm is not None and isinstance(value, tm.MetricCollection)
