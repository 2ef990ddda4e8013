"""Read-only views of a Trainer's state under Lightning's names (``trainer.current_epoch``, ``trainer.state``...).

Progress lives in the FitLoop, topology in the Strategy, metrics in the collector; these properties only
read them, so there is one owner for every value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from framework.hooks import Callback
    from framework.module import TrainModule

_RUNNING = {"fit": "training", "validate": "validating", "test": "testing", "predict": "predicting"}


@dataclass(frozen=True)
class TrainerState:
    """``trainer.state``: the entry point running (``fn``), the loop inside it (``stage``), and ``status``."""

    fn: str | None
    stage: str | None
    status: str  # "initializing", "running", "finished" or "interrupted" (an exception ended the run)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def stopped(self) -> bool:
        """The last run ended, normally or by an exception."""
        return self.status in ("finished", "interrupted")


class TrainerViews:
    """Properties mixed into Trainer; every one reads a component, none stores anything."""

    # ---- progress (FitLoop) ----------------------------------------------------------------------------
    @property
    def current_epoch(self) -> int:
        return self.fit_loop.current_epoch

    @property
    def global_step(self) -> int:
        """Optimizer-step boundaries reached (fp16-skipped and nan-policy-skipped steps included)."""
        return self.fit_loop.global_step

    @property
    def skipped_steps(self) -> int:
        return self.fit_loop.skipped_steps

    @property
    def batch_idx(self) -> int:
        """Index of the training batch being processed in the current epoch."""
        return self.fit_loop.batch_idx

    @property
    def is_last_batch(self) -> bool:
        num = self.num_training_batches
        return num is not None and self.fit_loop.batch_idx + 1 >= num

    @property
    def estimated_stepping_batches(self) -> int | float:
        """Optimizer steps the whole fit will take (Lightning's helper for OneCycleLR and the like)."""
        import math

        num = self.num_training_batches
        if self.max_steps >= 0:
            return self.max_steps
        if num is None or math.isinf(self.max_epochs):
            return math.inf
        k = self.accumulation.factor(0)
        return math.ceil(num / k) * int(self.max_epochs)

    @property
    def state(self) -> TrainerState:
        return TrainerState(fn=self.stage, stage=self._running_stage(), status=self._status)

    def _running_stage(self) -> str | None:
        """Lightning's RunningStage: "sanity_check", "train", "validate" (fit's validation too), "test",
        "predict"; None outside a run."""
        if self._status != "running":
            return None
        if self.sanity_checking:
            return "sanity_check"
        if self.stage == "fit":
            return "validate" if self._fit_validating else "train"
        return self.stage

    @property
    def training(self) -> bool:
        return self._running_stage() == "train"

    @property
    def validating(self) -> bool:
        """True inside a validation loop, fit's included (not the sanity check: ``sanity_checking``)."""
        return self._running_stage() == "validate"

    @property
    def testing(self) -> bool:
        return self._running_stage() == "test"

    @property
    def predicting(self) -> bool:
        return self._running_stage() == "predict"

    @property
    def evaluating(self) -> bool:
        return self._running_stage() in ("sanity_check", "validate", "test")

    @property
    def interrupted(self) -> bool:
        """The last run ended with an exception (Ctrl-C, preemption, an error)."""
        return self._status == "interrupted"

    @property
    def num_sanity_val_batches(self) -> list[int]:
        steps = self.num_sanity_val_steps
        return [n if steps < 0 or n is None else min(n, steps) for n in self.num_val_batches]

    @property
    def val_check_batch(self) -> int | float | None:
        return self.fit_loop.val_every

    @property
    def profiling(self) -> bool:
        """Whether a profiler is on (the loops then time each batch under Lightning's action names)."""
        from framework.profiler import PassThroughProfiler

        return not isinstance(self.profiler, PassThroughProfiler)

    @property
    def limit_train_batches(self) -> int | float | None:
        return self.limits["fit"]

    @property
    def limit_val_batches(self) -> int | float | None:
        return self.limits["validate"]

    @property
    def limit_test_batches(self) -> int | float | None:
        return self.limits["test"]

    @property
    def limit_predict_batches(self) -> int | float | None:
        return self.limits["predict"]

    # ---- callbacks, loggers, metrics -----------------------------------------------------------------------
    @property
    def callbacks(self) -> list[Callback]:
        return list(self.callback_list)

    def _first(self, kind: str) -> Any:
        found = self._all(kind)
        return found[0] if found else None

    def _all(self, kind: str) -> list[Any]:
        import importlib

        module, name = {"checkpoint": ("callbacks.checkpoint", "ModelCheckpoint"),
                        "early_stopping": ("callbacks.early_stopping", "EarlyStopping"),
                        "progress": ("callbacks.progress", "ProgressBar")}[kind]
        cls = getattr(importlib.import_module(module), name)
        return [cb for cb in self.callback_list if isinstance(cb, cls)]

    @property
    def checkpoint_callback(self) -> Any:
        return self._first("checkpoint")

    @property
    def checkpoint_callbacks(self) -> list[Any]:
        return self._all("checkpoint")

    @property
    def early_stopping_callback(self) -> Any:
        return self._first("early_stopping")

    @property
    def early_stopping_callbacks(self) -> list[Any]:
        return self._all("early_stopping")

    @property
    def progress_bar_callback(self) -> Any:
        return self._first("progress")

    @property
    def logger(self) -> Any:
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        """The first logger's directory (Lightning's rule), else ``default_root_dir``."""
        logger = self.logger
        if logger is None:
            return self.default_root_dir
        return getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or self.default_root_dir

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        return self._metrics.callback_metrics()

    @property
    def progress_bar_metrics(self) -> dict[str, torch.Tensor]:
        return self._metrics.progress_bar_metrics()

    # ---- topology (Strategy) ---------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank

    @property
    def local_rank(self) -> int:
        return self.strategy.local_rank

    @property
    def node_rank(self) -> int:
        return getattr(self.strategy, "node_rank", 0)

    @property
    def num_nodes(self) -> int:
        return getattr(self.strategy, "num_nodes", 1)

    @property
    def num_devices(self) -> int:
        return max(1, self.world_size // max(1, self.num_nodes))

    @property
    def is_global_zero(self) -> bool:
        return self.strategy.is_global_zero

    @property
    def precision(self) -> str:
        """The precision setting as a string (``trainer.precision_plugin`` is the plugin)."""
        return getattr(self.precision_plugin, "name", type(self.precision_plugin).__name__)

    @property
    def lightning_module(self) -> TrainModule | None:
        """Alias of ``module`` for code ported from Lightning."""
        return self.module

    @property
    def model(self) -> Any:
        """The module as the strategy runs it (a DDP/FSDP wrapper when there is one)."""
        return getattr(self.strategy, "model", None) or self.module

    # ---- data ---------------------------------------------------------------------------------------------------
    @property
    def train_dataloader(self) -> Any:
        feed = self.fit_loop.train_feed
        return feed.dataloader if feed is not None else None

    @property
    def val_dataloaders(self) -> Any:
        loaders = [feed.dataloader for feed in self.fit_loop.val_feeds]
        return loaders[0] if len(loaders) == 1 else (loaders or None)
