"""The Trainer: composes a Strategy, a Precision plugin, callbacks and loggers around a TrainModule.

``fit``/``validate``/``test``/``predict`` share one run skeleton (``_run``): set up the process
topology, attach and place the module, build optimizers after wrapping, prepare data, restore a
checkpoint, run the stage's loop, tear down. The loops themselves live in ``framework.loop`` and
``framework.evaluation``; argument checking in ``framework.arguments``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from callbacks.base import Callback, CallbackList
from framework import arguments
from framework.evaluation import run_evaluation, run_predict
from framework.loggers import resolve_loggers
from framework.loop import ManualOptimizer, TrainingBatch, run_fit, run_manual_batch
from framework.metrics import MetricCollector, to_floats
from framework.module import TrainModule
from framework.nan_policy import nan_guard
from framework.optim import LRSchedulerConfig, parse_optimizers, step_schedulers
from framework.pitfalls import FitGuard, check_optimizer_params
from framework.precision import resolve_precision
from framework.preemption import preemption_callbacks
from framework.rank_failures import RankFailureReport
from strategies.registry import resolve_strategy


class Trainer:
    """Runs a TrainModule's training, evaluation and prediction (arguments as in DESIGN.md §2)."""

    def __init__(
        self, *, accelerator: str = "auto", strategy: Any = "auto", devices: Any = "auto", num_nodes: int = 1,
        precision: Any = "32-true", callbacks: list[Callback] | Callback | None = None, logger: Any = True,
        default_root_dir: str | os.PathLike | None = None, max_epochs: int | None = None, max_steps: int = -1,
        accumulate_grad_batches: int | dict[int, int] = 1, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm", val_check_interval: int | float | None = None,
        check_val_every_n_epoch: int | None = 1, limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None, limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None, log_every_n_steps: int = 50,
        enable_checkpointing: bool = True, enable_progress_bar: bool = True, even_batches: bool = True,
        use_distributed_sampler: bool = True, deterministic: bool = False, on_preempt: str | None = "auto",
        nan_policy: str = "ignore",
    ) -> None:
        self.max_epochs, self.max_steps = arguments.epochs_and_steps(max_epochs, max_steps)
        self.gradient_clip_val = arguments.clip_value(gradient_clip_val)
        self.gradient_clip_algorithm = arguments.clip_algorithm(gradient_clip_algorithm)
        self.log_every_n_steps = arguments.positive_int("log_every_n_steps", log_every_n_steps)
        self.val_check_interval = arguments.val_check_interval(val_check_interval)
        self.check_val_every_n_epoch = arguments.optional_positive_int("check_val_every_n_epoch",
                                                                       check_val_every_n_epoch)
        self.limits = {stage: arguments.batch_limit(f"limit_{name}_batches", value) for stage, name, value in (
            ("fit", "train", limit_train_batches), ("validate", "val", limit_val_batches),
            ("test", "test", limit_test_batches), ("predict", "predict", limit_predict_batches))}
        self.default_root_dir = str(default_root_dir) if default_root_dir is not None else os.getcwd()
        self.even_batches = bool(even_batches)
        self.use_distributed_sampler = bool(use_distributed_sampler)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=deterministic == "warn")

        self.strategy = resolve_strategy(strategy, accelerator=accelerator, devices=devices, num_nodes=num_nodes)
        self.precision_plugin = self.strategy.connect_precision(
            resolve_precision(precision, self.strategy.root_device.type))
        self.loggers = resolve_loggers(logger, self.default_root_dir)
        self._accumulation, self._user_callbacks = arguments.callbacks(
            callbacks, accumulate_grad_batches, enable_checkpointing, enable_progress_bar)
        # Reliability (see framework.preemption, framework.nan_policy): both act at optimizer-step boundaries.
        self._nan_guard = nan_guard(nan_policy)
        if self._nan_guard is not None:
            self._user_callbacks.append(self._nan_guard)
        self._user_callbacks = preemption_callbacks(self._user_callbacks, on_preempt)
        if self.strategy.world_size > 1:
            self._user_callbacks.append(RankFailureReport())
        self._callback_list = CallbackList(self._user_callbacks)

        self.module: TrainModule | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[LRSchedulerConfig] = []
        self._manual_optimizers: list[ManualOptimizer] = []
        self._metrics = MetricCollector()
        self.logged_metrics: dict[str, torch.Tensor] = {}
        self.global_step = 0
        self.current_epoch = 0
        self.skipped_steps = 0
        self.should_stop = False
        self.sync_gradients = True
        self.last_loss: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None
        self.stage = "fit"
        self.num_training_batches: int | None = None
        self.num_val_batches: list[int | None] = []
        self.num_test_batches: list[int | None] = []
        self.num_predict_batches: list[int | None] = []
        self._resume_batch = 0
        self._batch_idx = 0
        self._batches_done = 0
        self._epoch_finished = False
        self._validated_at: tuple[int, int] | None = None
        self._resume_validation_pending = False
        self._val_every: int | None = None
        self._val_feeds: list[Any] = []
        self._data_seed = 0

    # ---- public properties -----------------------------------------------------------------------
    @property
    def callbacks(self) -> list[Callback]:
        return list(self._callback_list)

    @property
    def logger(self) -> Any:
        return self.loggers[0] if self.loggers else None

    @property
    def checkpoint_callback(self) -> Any:
        return next((cb for cb in self._callback_list if type(cb).__name__ == "ModelCheckpoint"), None)

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        return self._metrics.callback_metrics()

    @property
    def progress_bar_metrics(self) -> dict[str, torch.Tensor]:
        return self._metrics.progress_bar_metrics()

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
    def is_global_zero(self) -> bool:
        return self.strategy.is_global_zero

    @property
    def lightning_module(self) -> TrainModule | None:
        """Alias of ``module`` for code ported from Lightning."""
        return self.module

    # ---- entry points ----------------------------------------------------------------------------
    def fit(self, module: TrainModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
            ckpt_path: str | None = None) -> None:
        """Train ``module``; ``ckpt_path`` (a path, URL or "last") resumes exactly where a checkpoint left off."""
        arguments.check_module(module, "fit")
        self._run("fit", module, {"fit": train_dataloaders, "validate": val_dataloaders}, ckpt_path)

    def validate(self, module: TrainModule | None = None, dataloaders: Any = None,
                 ckpt_path: str | None = None) -> list[dict[str, float]]:
        """Run one validation epoch; one dict of epoch metrics per dataloader."""
        return self._run("validate", module, {"validate": dataloaders}, ckpt_path)

    def test(self, module: TrainModule | None = None, dataloaders: Any = None,
             ckpt_path: str | None = None) -> list[dict[str, float]]:
        """Run one test epoch; one dict of epoch metrics per dataloader."""
        return self._run("test", module, {"test": dataloaders}, ckpt_path)

    def predict(self, module: TrainModule | None = None, dataloaders: Any = None,
                ckpt_path: str | None = None) -> list[Any]:
        """Run ``predict_step`` over the data; the per-batch outputs."""
        return self._run("predict", module, {"predict": dataloaders}, ckpt_path)

    def save_checkpoint(self, path: str, *, safe_serialization: bool = True, writer: Any = None,
                        on_committed: Any = None) -> None:
        """Write a complete checkpoint of the current state to ``path`` (collective: call on every rank).

        ``writer`` (a ``framework.checkpoint.AsyncCheckpointWriter``) writes in the background after a
        snapshot; ``on_committed`` runs once the checkpoint is complete.
        """
        from framework.persistence import save_trainer_checkpoint

        if self.module is None:
            raise RuntimeError("trainer.save_checkpoint() needs a module: call it during or after trainer.fit().")
        save_trainer_checkpoint(self, path, safe_serialization=safe_serialization, writer=writer,
                                on_committed=on_committed)

    # ---- the run skeleton ------------------------------------------------------------------------
    def _run(self, stage: str, module: TrainModule | None, loaders: dict[str, Any], ckpt_path: str | None) -> Any:
        module = module if module is not None else self.module
        if module is None:
            raise ValueError(f"trainer.{stage}() needs a module: pass trainer.{stage}(module, ...) (no module "
                             "has been fit with this Trainer yet).")
        arguments.check_module(module, stage)
        self.stage = stage
        self.should_stop = False
        self.strategy.setup_environment()
        self._setup_module(module, stage)
        try:
            self._setup_data(stage, loaders)
            self._call_callbacks("setup", stage)
            if ckpt_path is not None:
                from framework.persistence import restore_trainer_checkpoint

                restore_trainer_checkpoint(self, ckpt_path, training=stage == "fit")
            if stage == "fit":
                result = self._fit()
            elif stage == "predict":
                result = run_predict(self, self._feeds("predict"))
            else:
                result = run_evaluation(self, stage, self._feeds(stage))
            self._call_callbacks("teardown", stage)
        except BaseException as exc:
            self._call_callbacks("on_exception", exc)
            for logger in self.loggers:
                logger.finalize("failed")
            self.strategy.teardown()
            raise
        for logger in self.loggers:
            logger.finalize("success")
        self.strategy.teardown()
        return result

    def _fit(self) -> None:
        if self._train_feed is None:
            if self.limits["fit"] == 0:
                raise ValueError("limit_train_batches=0 leaves nothing to train; use a count >= 1, a fraction > 0, "
                                 "or None for every batch.")
            raise ValueError("trainer.fit() got no training data: pass train_dataloaders=... or define "
                             "train_dataloader() on the module.")
        self._val_every = arguments.val_every_batches(self.val_check_interval, self._train_feed.num_batches)
        self._fit_guard = FitGuard(self)  # the model moved after placement; optimizers stepped by hand
        self._training_batch = TrainingBatch(self)
        self._manual_batch = lambda *a: run_manual_batch(self, *a)
        self._training_step_fn = self.strategy.step_function("training_step")
        self._call_hooks("on_fit_start")
        with self._fit_guard:
            run_fit(self)
        self._call_hooks_end("on_fit_end")

    def _setup_module(self, module: TrainModule, stage: str) -> None:
        first_time = module is not self.module or self.strategy.module is not module
        object.__setattr__(module, "_trainer", self)
        self.module = module
        if first_time:
            if not getattr(module, "_kiln_model_configured", False):
                module.configure_model()
                object.__setattr__(module, "_kiln_model_configured", True)
            self.optimizers = []
            self.strategy.setup_module(module)
        if stage == "fit" and not self.optimizers:  # also after an evaluation-only run on this module
            optimizers, configs = parse_optimizers(module.configure_optimizers())
            check_optimizer_params(module, optimizers)  # before a strategy wraps them (DeepSpeed)
            self.optimizers = self.strategy.setup_optimizers(optimizers, gradient_clip_val=self.gradient_clip_val,
                                                             gradient_clip_algorithm=self.gradient_clip_algorithm)
            self.lr_scheduler_configs = configs
            self._manual_optimizers = [ManualOptimizer(o, self) for o in self.optimizers]
        self._metrics.reduce = self.strategy.all_reduce if self.strategy.world_size > 1 else None

    def _setup_data(self, stage: str, loaders: dict[str, Any]) -> None:
        from framework.data import DataFeed

        seed = int(os.environ.get("KILN_GLOBAL_SEED", torch.initial_seed() % 2**31))
        self._data_seed = self.strategy.broadcast(seed)
        self._stage_feeds: dict[str, list[Any]] = {}
        hook_names = {"fit": "train_dataloader", "validate": "val_dataloader", "test": "test_dataloader",
                      "predict": "predict_dataloader"}
        wanted = ["fit", "validate"] if stage == "fit" else [stage]
        for name in wanted:
            given = loaders.get(name)
            if given is None and hasattr(self.module, hook_names[name]):
                given = getattr(self.module, hook_names[name])()
            limit = self.limits[name]
            if given is None or limit == 0:
                self._stage_feeds[name] = []
                continue
            given = list(given) if isinstance(given, (list, tuple)) else [given]
            self._stage_feeds[name] = [
                DataFeed(self.strategy.process_dataloader(
                    dl, stage=name, seed=self._data_seed, use_distributed_sampler=self.use_distributed_sampler,
                    even_batches=self.even_batches, limit_batches=limit), limit,
                    "limit_{}_batches".format({"fit": "train", "validate": "val"}.get(name, name)))
                for dl in given]
        if stage == "fit":
            train = self._stage_feeds["fit"]
            if len(train) > 1:
                raise ValueError("trainer.fit() takes one training dataloader; combine several into one dataset "
                                 "(e.g. torch.utils.data.ConcatDataset) first.")
            self._train_feed = train[0] if train else None
            self._val_feeds = self._stage_feeds["validate"] if _overrides(self.module, "validation_step") else []
            if self._stage_feeds["validate"] and not self._val_feeds:
                warnings.warn(f"trainer.fit() got validation data but {type(self.module).__name__} defines no "
                              "validation_step(); validation is skipped. Define validation_step to validate.",
                              stacklevel=3)
            self.num_val_batches = [feed.num_batches for feed in self._val_feeds]
        else:
            counts = [feed.num_batches for feed in self._stage_feeds[stage]]
            setattr(self, {"validate": "num_val_batches", "test": "num_test_batches",
                           "predict": "num_predict_batches"}[stage], counts)
        if stage != "fit" and not self._stage_feeds[stage]:
            raise ValueError(f"trainer.{stage}() got no data: pass dataloaders=... or define "
                             f"{hook_names[stage]}() on the module.")

    def _feeds(self, stage: str) -> list[Any]:
        return self._stage_feeds[stage]

    # ---- pieces the loops call ---------------------------------------------------------------------
    def _call_hooks(self, name: str, *args: Any, module_hook: bool = True) -> None:
        """Callbacks first, then the module (Lightning's order for *_start and per-step hooks)."""
        getattr(self._callback_list, name)(self, self.module, *args)
        if module_hook and hasattr(self.module, name):
            getattr(self.module, name)(*args)

    def _call_hooks_end(self, name: str, *args: Any, module_hook: bool = True) -> None:
        """The module first, then callbacks, so callbacks see what the module logged in its *_end hook."""
        if module_hook and hasattr(self.module, name):
            getattr(self.module, name)(*args)
        getattr(self._callback_list, name)(self, self.module, *args)

    def _call_callbacks(self, name: str, *args: Any) -> None:
        getattr(self._callback_list, name)(self, self.module, *args)

    def _max_steps_reached(self) -> bool:
        return 0 <= self.max_steps <= self.global_step

    def _after_optimizer_step(self, stepped: bool, schedulers: bool = True) -> None:
        self.global_step += 1
        if not stepped:
            self.skipped_steps += 1
        if schedulers and self.lr_scheduler_configs:
            step_schedulers(self.lr_scheduler_configs, "step", self.global_step, skipped=not stepped)
        if self.global_step % self.log_every_n_steps == 0 and self._metrics.step_values:
            self._log_to_loggers(self._metrics.step_values)  # host transfer only when a logger is attached

    def _log_to_loggers(self, metrics: dict[str, torch.Tensor]) -> None:
        if not metrics:
            return
        self.logged_metrics.update(metrics)
        if self.loggers:
            floats = to_floats(metrics)
            floats.setdefault("epoch", float(self.current_epoch))
            for logger in self.loggers:
                logger.log_metrics(floats, step=self.global_step)

    def _flush_epoch_metrics(self, stage: str) -> None:
        self._log_to_loggers(self._metrics.reduce_epoch())
        for logger in self.loggers:
            logger.save()

    def _should_validate_at_epoch_end(self) -> bool:
        if not self._val_feeds:
            return False
        every = self.check_val_every_n_epoch
        if every is None or (self.current_epoch + 1) % every:
            return False
        # An int/fractional val_check_interval validates at its multiples only (as in Lightning).
        return self._val_every is None or self._batches_done % self._val_every == 0

    def _run_validation(self) -> None:
        if self._val_feeds:
            run_evaluation(self, "validate", self._val_feeds)
            self._validated_at = (self.current_epoch, self._batches_done)

    def _validation_pending_at_resume(self, start: int) -> bool:
        """True when a resumed epoch starts at an in-epoch validation point the saved run had not run yet."""
        pending, self._resume_validation_pending = self._resume_validation_pending, False
        num = self._train_feed.num_batches
        return (pending and bool(self._val_feeds) and self._val_every is not None and start % self._val_every == 0
                and (num is None or start < num))


def _overrides(module: TrainModule, name: str) -> bool:
    return getattr(type(module), name, None) is not getattr(TrainModule, name, None)
