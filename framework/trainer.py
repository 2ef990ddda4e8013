"""The Trainer: composes a Strategy, a Precision plugin, callbacks, loggers and the loops around a TrainModule.

``fit``/``validate``/``test``/``predict`` share one run skeleton (``_run``), in Lightning's order:
``configure_callbacks`` → ``prepare_data`` → ``setup`` hooks → ``configure_model`` and placement →
optimizers → checkpoint restore → the stage (``FitLoop`` or ``EvaluationLoop``) → ``teardown``.
Arguments are checked in ``framework.arguments``; read-only views live in ``framework.trainer_views``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from framework import arguments
from framework.compile import CompileSetup
from framework.elastic import check_resume, resolve_ckpt_path
from framework.hooks import Callback, CallbackList, HookCaller, checkpoints_last, merge_configured_callbacks
from framework.loggers import log_run_start, resolve_loggers
from framework.loops.batch_indices import PredictionIndices
from framework.loops.evaluation import EvaluationLoop
from framework.loops.fit import FitLoop
from framework.loops.logging import MetricLogging
from framework.loops.sources import StageData
from framework.loops.step import KilnOptimizer
from framework.metrics import MetricCollector, to_floats
from framework.module import TrainModule
from framework.optim import LRSchedulerConfig, parse_optimizers
from framework.pitfalls import FitGuard, check_optimizer_params
from framework.precision import resolve_precision
from framework.rank_zero import sync_rank
from framework.run_settings import run_settings
from framework.seed import SEED_ENV
from framework.trainer_views import TrainerViews
from strategies.registry import resolve_strategy


class Trainer(TrainerViews):
    """Runs a TrainModule's training, evaluation and prediction; arguments mean what they mean in Lightning
    2.x (DESIGN.md §2), plus Kiln's ``even_batches``, ``on_preempt``, ``nan_policy``, ``compile`` (None, True
    or a dict of ``torch.compile`` arguments: see ``framework.compile``) and ``resume`` (framework.elastic: after a
    torchrun restart or a SLURM requeue, ``fit`` resumes from the newest checkpoint)."""

    def __init__(
        self, *, accelerator: str = "auto", strategy: Any = "auto", devices: Any = "auto", num_nodes: int = 1,
        precision: Any = None, logger: Any = None, callbacks: list[Callback] | Callback | None = None,
        fast_dev_run: int | bool = False, max_epochs: int | None = None, min_epochs: int | None = None,
        max_steps: int = -1, min_steps: int | None = None, max_time: Any = None,
        limit_train_batches: int | float | None = None, limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None, limit_predict_batches: int | float | None = None,
        overfit_batches: int | float = 0.0, val_check_interval: int | float | None = None,
        check_val_every_n_epoch: int | None = 1, num_sanity_val_steps: int | None = None,
        log_every_n_steps: int | None = None, enable_checkpointing: bool | None = None,
        enable_progress_bar: bool | None = None, enable_model_summary: bool | None = None,
        accumulate_grad_batches: int | dict[int, int] = 1, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None, deterministic: bool | str | None = None,
        benchmark: bool | None = None, inference_mode: bool = True, use_distributed_sampler: bool = True,
        profiler: Any = None, detect_anomaly: bool = False, barebones: bool = False, plugins: Any = None,
        sync_batchnorm: bool = False, reload_dataloaders_every_n_epochs: int = 0,
        default_root_dir: str | os.PathLike | None = None, model_registry: str | None = None,
        even_batches: bool = True, on_preempt: str | None = "auto", nan_policy: str = "ignore",
        compile: bool | dict[str, Any] | None = None,
        resume: str | None = "auto",
    ) -> None:
        arguments.refuse_unsupported(model_registry=model_registry)
        run = run_settings(
            fast_dev_run=fast_dev_run, barebones=barebones, max_epochs=max_epochs, max_steps=max_steps,
            limits=(limit_train_batches, limit_val_batches, limit_test_batches, limit_predict_batches),
            overfit_batches=overfit_batches, num_sanity_val_steps=num_sanity_val_steps,
            log_every_n_steps=log_every_n_steps, val_check_interval=val_check_interval,
            check_val_every_n_epoch=check_val_every_n_epoch, logger=logger,
            enable_checkpointing=enable_checkpointing, enable_progress_bar=enable_progress_bar,
            enable_model_summary=enable_model_summary)
        self.fast_dev_run, self.barebones, self.overfit_batches = run.fast_dev_run, barebones, run.overfit_batches
        self.max_epochs, self.max_steps = arguments.epochs_and_steps(run.max_epochs, run.max_steps)
        self.min_epochs = arguments.optional_non_negative_int("min_epochs", min_epochs)
        self.min_steps = arguments.optional_non_negative_int("min_steps", min_steps)
        self.max_time = arguments.max_time(max_time)
        self.limits = dict(zip(("fit", "validate", "test", "predict"), run.limits))
        self.num_sanity_val_steps = run.num_sanity_val_steps
        self.log_every_n_steps = run.log_every_n_steps
        self.val_check_interval = run.val_check_interval
        self.check_val_every_n_epoch = run.check_val_every_n_epoch
        self.gradient_clip_val = arguments.clip_value(gradient_clip_val)
        self.gradient_clip_algorithm = arguments.clip_algorithm(gradient_clip_algorithm or "norm")
        self.reload_dataloaders_every_n_epochs = arguments.non_negative_int(
            "reload_dataloaders_every_n_epochs", reload_dataloaders_every_n_epochs)
        self.default_root_dir = str(default_root_dir) if default_root_dir is not None else os.getcwd()
        self.even_batches = bool(even_batches)
        self.resume = check_resume(resume)
        self.use_distributed_sampler = bool(use_distributed_sampler)
        self.inference_mode = arguments.flag("inference_mode", inference_mode)
        self.detect_anomaly = arguments.flag("detect_anomaly", detect_anomaly)
        self.sync_batchnorm = arguments.flag("sync_batchnorm", sync_batchnorm)
        arguments.apply_determinism(deterministic, benchmark)

        precision = arguments.precision_from_plugins(precision, plugins)
        self.strategy = resolve_strategy(strategy, accelerator=accelerator, devices=devices, num_nodes=num_nodes)
        self.precision_plugin = self.strategy.connect_precision(
            resolve_precision(precision, self.strategy.root_device.type))
        self._compile = CompileSetup(compile, self.strategy)  # refuses strategies that cannot take it
        self.loggers = [] if run.logger is False else resolve_loggers(run.logger, self.default_root_dir)
        self.profiler = arguments.profiler(profiler, self.default_root_dir)
        self.accumulation, user_callbacks = arguments.callbacks(
            callbacks, accumulate_grad_batches, run.enable_checkpointing, run.enable_progress_bar)
        self.nan_guard, reliability = arguments.reliability_callbacks(nan_policy, on_preempt, user_callbacks,
                                                                      self.strategy.world_size)
        extra = arguments.summary_and_timer(run.enable_model_summary, self.max_time, user_callbacks)
        self._trainer_callbacks = checkpoints_last(user_callbacks + extra + reliability)
        self.callback_list = CallbackList(self._trainer_callbacks)

        self.module: TrainModule | None = None
        self.datamodule: Any = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[LRSchedulerConfig] = []
        self._manual_optimizers: list[KilnOptimizer] = []
        self._metrics = MetricCollector()
        self.metric_logging = MetricLogging(self)
        self.fit_loop = FitLoop(self)
        self.predict_loop = PredictionIndices()
        self.hooks: HookCaller | None = None
        self.fit_guard: FitGuard | None = None
        self.logged_metrics: dict[str, torch.Tensor] = {}
        self.should_stop = False
        self.sanity_checking = False
        self.sync_gradients = True
        self.last_loss: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None
        self.stage: str | None = None
        self._status = "initializing"  # trainer.state.status: running during a run, then finished or interrupted
        self._fit_validating = False  # inside fit's validation loop (trainer.validating, state.stage)
        self.ckpt_path: str | None = None
        self.num_training_batches: int | float | None = None
        self.num_val_batches: list[int | None] = []
        self.num_test_batches: list[int | None] = []
        self.num_predict_batches: list[int | None] = []

    # ---- entry points (Lightning's signatures) -----------------------------------------------------
    def fit(self, model: TrainModule | None = None, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: Any = None, ckpt_path: str | None = None, *, module: TrainModule | None = None) -> None:
        """Train; ``ckpt_path`` (a path, URL, "last" or "best") resumes exactly where a checkpoint left off."""
        model = self._compile.adopt(arguments.one_module(model, module, "fit"))  # torch.compile(m) → m
        train_dataloaders, datamodule = arguments.split_datamodule(train_dataloaders, datamodule, "train_dataloaders")
        arguments.check_module(model, "fit")
        self._run("fit", model, {"fit": train_dataloaders, "validate": val_dataloaders}, datamodule, ckpt_path)

    def validate(self, model: TrainModule | None = None, dataloaders: Any = None, ckpt_path: str | None = None,
                 verbose: bool = True, datamodule: Any = None, *, module: TrainModule | None = None
                 ) -> list[dict[str, float]]:
        """One validation epoch; one dict of epoch metrics per dataloader (printed as a table when verbose)."""
        return self._evaluate("validate", arguments.one_module(model, module, "validate"), dataloaders, ckpt_path,
                              verbose, datamodule)

    def test(self, model: TrainModule | None = None, dataloaders: Any = None, ckpt_path: str | None = None,
             verbose: bool = True, datamodule: Any = None, *, module: TrainModule | None = None
             ) -> list[dict[str, float]]:
        """One test epoch; one dict of epoch metrics per dataloader (printed as a table when verbose)."""
        return self._evaluate("test", arguments.one_module(model, module, "test"), dataloaders, ckpt_path, verbose,
                              datamodule)

    def predict(self, model: TrainModule | None = None, dataloaders: Any = None, datamodule: Any = None,
                return_predictions: bool | None = None, ckpt_path: str | None = None, *,
                module: TrainModule | None = None) -> list[Any] | None:
        """``predict_step`` over the data; the outputs (one list per dataloader when there are several)."""
        model = arguments.one_module(model, module, "predict")
        dataloaders, datamodule = arguments.split_datamodule(dataloaders, datamodule, "dataloaders")
        keep = True if return_predictions is None else bool(return_predictions)
        result = self._run("predict", model, {"predict": dataloaders}, datamodule, ckpt_path, keep=keep)
        return result if keep else None

    def save_checkpoint(self, filepath: str, weights_only: bool = False, storage_options: Any = None, *,
                        safe_serialization: bool = True, writer: Any = None, on_committed: Any = None) -> None:
        """Write a complete checkpoint directory of the current state (collective: call it on every rank).

        ``writer`` (an ``AsyncCheckpointWriter``) writes in the background after a snapshot; ``on_committed``
        runs once the checkpoint is complete.
        """
        from framework.checkpoint.trainer_state import save_trainer_checkpoint

        if storage_options is not None:
            raise ValueError("save_checkpoint(storage_options=...) is not supported: Kiln writes through fsspec, so "
                             "pass credentials and options in the URL (e.g. s3://key:secret@bucket/path).")
        if self.module is None:
            raise RuntimeError("trainer.save_checkpoint() needs a module: call it during or after trainer.fit().")
        save_trainer_checkpoint(self, str(filepath), weights_only=weights_only, safe_serialization=safe_serialization,
                                writer=writer, on_committed=on_committed)

    # ---- the run skeleton ----------------------------------------------------------------------------
    def _evaluate(self, stage: str, model: Any, dataloaders: Any, ckpt_path: Any, verbose: bool,
                  datamodule: Any) -> list[dict[str, float]]:
        dataloaders, datamodule = arguments.split_datamodule(dataloaders, datamodule, "dataloaders")
        results = self._run(stage, model, {stage: dataloaders}, datamodule, ckpt_path)
        floats = [to_floats(metrics) for metrics in results]
        if verbose and self.is_global_zero:
            from framework.results import print_results

            print_results(floats, stage)
        return floats

    def _run(self, stage: str, module: TrainModule | None, loaders: dict[str, Any], datamodule: Any,
             ckpt_path: str | None, keep: bool = True) -> Any:
        module = self._compile.adopt(module) if module is not None else self.module
        if module is None:
            raise ValueError(f"trainer.{stage}() needs a model: pass trainer.{stage}(model, ...) (no model has been "
                             "fit with this Trainer yet).")
        arguments.check_module(module, stage)
        if datamodule is not None:
            arguments.check_datamodule(datamodule, loaders, stage)
        self.stage, self.should_stop, self.datamodule, self._status = stage, False, datamodule, "running"
        self._metrics.reset_metrics()  # every run starts with empty callback/logged metrics (Lightning's rule)
        self.logged_metrics.clear()
        object.__setattr__(module, "_trainer", self)
        if datamodule is not None:
            object.__setattr__(datamodule, "trainer", self)
        self.callback_list = CallbackList(merge_configured_callbacks(self._trainer_callbacks,
                                                                     module.configure_callbacks()))
        self.strategy.setup_environment()
        sync_rank(self.global_rank)  # rank_zero_only follows this process's rank from here on
        hooks = self.hooks = HookCaller(self, module, self.callback_list, datamodule)
        self._prepare_data(hooks)
        fn = "fit" if stage == "fit" else stage
        try:
            hooks.datamodule_hook("setup", fn)
            hooks.callbacks("setup", fn)
            hooks.module_hook("setup", fn)
            self._setup_module(module, stage)
            log_run_start(self.loggers, module, datamodule)
            data = StageData(self, loaders, datamodule, self._data_seed())
            if stage == "fit":  # a restarted job (torchrun, SLURM requeue) resumes from its newest checkpoint
                ckpt_path = resolve_ckpt_path(ckpt_path, self.resume, getattr(self.checkpoint_callback, "dirpath", None),
                                              rank=self.global_rank, broadcast=self.strategy.broadcast)
            if ckpt_path is not None:
                from framework.checkpoint.trainer_state import restore_trainer_checkpoint

                self.ckpt_path = restore_trainer_checkpoint(self, ckpt_path, training=stage == "fit")
            self.profiler.setup(stage, self.local_rank if self.world_size > 1 else None, self.log_dir)
            with self.profiler.profile(f"run_{stage}"), torch.autograd.set_detect_anomaly(self.detect_anomaly):
                result = self._run_stage(stage, hooks, data, keep)
            self.profiler.teardown(stage)
            hooks.datamodule_hook("teardown", fn)
            hooks.callbacks("teardown", fn)
            hooks.module_hook("teardown", fn)
        except BaseException as exc:
            self._status = "interrupted"
            hooks.callbacks("on_exception", exc)
            hooks.datamodule_hook("on_exception", exc)
            for logger in self.loggers:
                logger.finalize("failed")
            self.profiler.teardown(stage)  # a torch.profiler run and its module hooks end with the stage
            self.strategy.teardown()
            raise
        for logger in self.loggers:
            logger.finalize("success")
        self.profiler.describe()
        self.strategy.teardown()
        self._status = "finished"
        return result

    def _run_stage(self, stage: str, hooks: HookCaller, data: StageData, keep: bool) -> Any:
        if stage != "fit":
            feeds = data.feeds(stage)
            if not feeds:
                raise ValueError(f"trainer.{stage}() got no data: pass dataloaders=..., a datamodule=..., or define "
                                 f"{'val' if stage == 'validate' else stage}_dataloader() on the module.")
            results = EvaluationLoop(self, hooks, stage, feeds, return_predictions=keep).run()
            if stage != "predict":
                self.metric_logging.log_results(results)
            return results
        self.fit_guard = FitGuard(self)  # the model moved after placement; optimizers stepped by hand
        hooks.both("on_fit_start")
        with self.fit_guard:
            self.fit_loop.run(hooks, data)
        hooks.both("on_fit_end")
        return None

    def _prepare_data(self, hooks: HookCaller) -> None:
        """``prepare_data`` (DataModule's first, then the module's) once per node on local rank 0 — or once in
        all on global rank 0 for an object with ``prepare_data_per_node = False`` — then a barrier."""
        for owner, call in ((hooks.datamodule, hooks.datamodule_hook), (hooks.module, hooks.module_hook)):
            if owner is None:
                continue
            rank = self.local_rank if getattr(owner, "prepare_data_per_node", True) else self.global_rank
            if rank == 0:
                call("prepare_data")
        if self.world_size > 1:
            self.strategy.barrier("prepare_data")

    def _setup_module(self, module: TrainModule, stage: str) -> None:
        first_time = module is not self.module or self.strategy.module is not module
        self.module = module
        if first_time:
            if not getattr(module, "_kiln_model_configured", False):
                module.configure_model()
                object.__setattr__(module, "_kiln_model_configured", True)
            if self.sync_batchnorm and self.world_size > 1:
                torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            self.optimizers = []
            self.strategy.setup_module(module)
            self._compile.apply(module)  # each block's forward, after TP/FSDP/DDP wrapping (framework.compile)
        if stage == "fit" and not self.optimizers:  # also after an evaluation-only run on this module
            optimizers, configs = parse_optimizers(module.configure_optimizers(),
                                                   automatic=module.automatic_optimization,
                                                   custom_step=self.hooks.module_overrides("lr_scheduler_step"))
            check_optimizer_params(module, optimizers)  # before a strategy wraps them (DeepSpeed)
            self.optimizers = self.strategy.setup_optimizers(optimizers, gradient_clip_val=self.gradient_clip_val,
                                                             gradient_clip_algorithm=self.gradient_clip_algorithm)
            self.lr_scheduler_configs = configs
            self._manual_optimizers = [KilnOptimizer(o, trainer=self) for o in self.optimizers]
        # Logged values reduce over the data-parallel replicas (all ranks, except under tensor parallelism).
        self._metrics.reduce = self.strategy.reduce_metric if self.strategy.world_size > 1 else None

    def _data_seed(self) -> int:
        seed = int(os.environ.get(SEED_ENV, torch.initial_seed() % 2**31))
        return self.strategy.broadcast(seed)

    # ---- pieces the loops and the module call --------------------------------------------------------------
    def val_every_batches(self, num_batches: int | None) -> int | None:
        """Batches between in-epoch validations for an epoch of ``num_batches`` (None: only at the epoch's end)."""
        return arguments.val_every_batches(self.val_check_interval, num_batches)

    @property
    def validation_enabled(self) -> bool:
        """Lightning skips validation when the module has no validation_step (or sets it to None)."""
        from framework.hooks import overrides

        module = self.module
        return module is not None and getattr(module, "validation_step", None) is not None and \
            overrides(module, "validation_step", TrainModule) and self.limits["validate"] != 0

    def _call_hooks(self, name: str, *args: Any) -> None:
        """Callbacks, then the module (used by ``TrainModule.manual_backward``)."""
        self.hooks.both(name, *args)
