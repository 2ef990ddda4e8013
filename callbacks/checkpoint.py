"""ModelCheckpoint: when to save, what to name it, and which checkpoints to keep.

Each checkpoint is one directory directly under ``dirpath`` (default ``<default_root_dir>/checkpoints``),
named ``epoch={epoch}-step={step}`` unless ``filename`` says otherwise. Saving is collective (every rank
calls it); deleting old checkpoints happens on rank 0 and only after the new checkpoint is complete —
for ``async_save=True`` that is when its background write has committed. "last" is not a copy or a
link: ``ckpt_path="last"`` scans ``dirpath`` for the newest complete checkpoint, and ``save_last=True``
guarantees rotation never deletes that newest one.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import TYPE_CHECKING, Any

import torch

from callbacks.base import Callback
from framework.checkpoint.storage import join_path

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

_DEFAULT_FILENAME = "epoch={epoch}-step={step}"


class ModelCheckpoint(Callback):
    """Save checkpoints every N steps and/or epochs, keep the best ``save_top_k`` and/or newest ``total_limit``."""

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = None,
                 mode: str = "min", save_top_k: int | None = None, total_limit: int | None = None,
                 every_n_train_steps: int | None = None, every_n_epochs: int | None = 1, save_last: bool = True,
                 safe_serialization: bool = True, async_save: bool = False) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint(mode={mode!r}) is not valid; use 'min' or 'max'.")
        for name, value in (("save_top_k", save_top_k), ("total_limit", total_limit),
                            ("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"ModelCheckpoint({name}={value!r}) is not valid; use an int >= 0 or None.")
        if save_top_k is not None and monitor is None and save_top_k not in (0,):
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k}) needs monitor='<metric>' to rank "
                             "checkpoints; to keep the newest k checkpoints use total_limit=k.")
        if filename is not None and ("/" in filename or "\\" in filename):
            raise ValueError(f"ModelCheckpoint(filename={filename!r}) must be a name, not a path; put the folder "
                             "in dirpath.")
        self.dirpath = str(dirpath) if dirpath is not None else None
        self.filename = filename or _DEFAULT_FILENAME
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.total_limit = total_limit
        self.every_n_train_steps = every_n_train_steps or None
        self.every_n_epochs = every_n_epochs or None
        self.save_last = save_last
        self.safe_serialization = safe_serialization
        self.async_save = async_save
        self.best_k_models: dict[str, float] = {}
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.last_model_path = ""
        self._last_saved_step = -1
        self._kept_as_last = ""  # a checkpoint outside the top-k kept only because it was the newest
        self._validated = False  # whether validation ran in this fit (a monitored val metric can't be missing)
        self._warned_missing = False
        self._writer: Any = None

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint[monitor={self.monitor},mode={self.mode}]" if self.monitor else "ModelCheckpoint"

    # ---- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = join_path(trainer.default_root_dir, "checkpoints")
        self._validated = self._warned_missing = False
        if stage == "fit" and trainer.is_global_zero:
            from framework.checkpoint import cleanup_stale

            # Leftovers of saves or deletions a crash cut short (never another process's running save).
            cleanup_stale(self.dirpath)
        if self.async_save and self._writer is None:
            from framework.checkpoint import AsyncCheckpointWriter

            self._writer = AsyncCheckpointWriter()

    def on_train_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = self.every_n_train_steps
        if n and trainer.sync_gradients and trainer.global_step % n == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self._save(trainer)

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._validated = True

    def on_fit_end(self, trainer: Trainer, module: TrainModule) -> None:
        self.wait(trainer)

    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        if self._writer is not None:
            try:
                self._writer.wait()
            except Exception:  # the training error is the one to report
                pass

    def teardown(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        self.wait(trainer)

    # ---- saving and rotation -------------------------------------------------------------------------
    def wait(self, trainer: Trainer | None = None) -> None:
        """Block until a background save has committed; re-raise its error (async_save only)."""
        if self._writer is not None:
            self._writer.wait()

    def save_now(self, trainer: Trainer) -> str:
        """Save the current state now (collective) and wait until it is committed; returns its path.

        For preemption and ``nan_policy="stop"``: the checkpoint lands in ``dirpath`` so that
        ``ckpt_path="last"`` finds it; a step already saved is not saved twice.
        """
        self._save(trainer)
        self.wait(trainer)
        return self.last_model_path

    def _save(self, trainer: Trainer) -> None:
        if trainer.global_step == self._last_saved_step or trainer.stage != "fit":
            return
        # The previous background save rotates (mutating best_k_models) when it commits: let it finish before
        # this save ranks itself and snapshots this callback's state. The snapshot would wait for it anyway.
        self.wait(trainer)
        metrics = trainer.callback_metrics
        score = self._monitored(metrics)
        path = join_path(self.dirpath, self._name(trainer, metrics))
        self._last_saved_step = trainer.global_step
        # Recorded before writing so that the checkpoint's own callback state already ranks it.
        self.last_model_path = path
        if score is not None:
            self.best_k_models[path] = score
        trainer.save_checkpoint(path, safe_serialization=self.safe_serialization, writer=self._writer,
                                on_committed=lambda: self._after_commit(trainer, path, score))

    def _after_commit(self, trainer: Trainer, path: str, score: float | None) -> None:
        """Runs on every rank once ``path`` is complete (possibly in the writer's thread); rank 0 rotates."""
        if score is not None:
            best = min if self.mode == "min" else max
            self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)
            self.best_model_score = self.best_k_models[self.best_model_path]
        if trainer.is_global_zero:
            self._rotate(path)

    def _rotate(self, newest: str) -> None:
        from framework.checkpoint import list_checkpoints, remove_checkpoint

        doomed: set[str] = set()
        if self.monitor is not None and self.save_top_k is not None:
            ranked = sorted(self.best_k_models, key=self.best_k_models.get, reverse=self.mode == "max")
            doomed.update(ranked[self.save_top_k:])
            for path in ranked[self.save_top_k:]:
                self.best_k_models.pop(path, None)
            if self._kept_as_last and self._kept_as_last != newest:  # no longer the newest
                doomed.add(self._kept_as_last)
        if self.total_limit is not None:
            complete = [info.path for info in list_checkpoints(self.dirpath)]
            doomed.update(complete[self.total_limit:])
        self._kept_as_last = ""
        if self.save_last and newest in doomed:
            doomed.discard(newest)
            self._kept_as_last = newest
        for path in sorted(doomed):
            try:  # force: finish deleting one whose manifest went first but whose files were left by a crash
                remove_checkpoint(path, force=True)
            except FileNotFoundError:  # already gone: rankings restored from a checkpoint predate its rotation
                pass

    def _monitored(self, metrics: dict[str, torch.Tensor]) -> float | None:
        if self.monitor is None:
            return None
        if self.monitor not in metrics:
            message = (f"ModelCheckpoint(monitor={self.monitor!r}) found no such metric; logged metrics are "
                       f"{sorted(metrics)}. Log it with self.log({self.monitor!r}, ...) or change monitor.")
            if self._validated:
                raise KeyError(message)
            # e.g. a validation metric before the first validation (of this run or since resuming): save, rank last
            if not self._warned_missing:
                self._warned_missing = True
                warnings.warn(f"{message} Validation has not run yet: checkpoints are ranked last until it is "
                              "logged.", stacklevel=2)
            return math.inf if self.mode == "min" else -math.inf
        value = float(metrics[self.monitor])
        if math.isnan(value):
            value = math.inf if self.mode == "min" else -math.inf
        return value

    def _name(self, trainer: Trainer, metrics: dict[str, torch.Tensor]) -> str:
        values: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key in re.findall(r"{([^:}]+)", self.filename):
            if key not in values and key in metrics:
                values[key] = float(metrics[key])
        try:
            name = self.filename.format(**values)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"ModelCheckpoint(filename={self.filename!r}) could not be formatted ({exc}); use "
                             f"fields among {sorted(values)} or logged metric names {sorted(metrics)}.") from None
        name = name.replace("/", "_")
        existing = set(self.best_k_models) | {self.last_model_path}
        base, version = name, 1
        while join_path(self.dirpath, name) in existing or _exists(join_path(self.dirpath, name)):
            name, version = f"{base}-v{version}", version + 1
        return name

    # ---- checkpointed state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best_k_models": dict(self.best_k_models), "best_model_path": self.best_model_path,
                "best_model_score": self.best_model_score, "last_model_path": self.last_model_path,
                "dirpath": self.dirpath, "last_saved_step": self._last_saved_step, "kept_as_last": self._kept_as_last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath") not in (None, self.dirpath):
            return  # a different run's folder: its rankings don't apply here
        self.best_k_models = {str(k): float(v) for k, v in state_dict.get("best_k_models", {}).items()}
        self.best_model_path = state_dict.get("best_model_path", "")
        self.best_model_score = state_dict.get("best_model_score")
        if self.best_k_models:  # the saved ranking already holds the checkpoint being resumed
            best = min if self.mode == "min" else max
            self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)
            self.best_model_score = self.best_k_models[self.best_model_path]
        self.last_model_path = state_dict.get("last_model_path", "")
        # the step of the checkpoint being resumed is not saved again (e.g. by the epoch end right after it)
        self._last_saved_step = int(state_dict.get("last_saved_step", -1))
        self._kept_as_last = state_dict.get("kept_as_last", "")


def _exists(path: str) -> bool:
    from framework.checkpoint.storage import locate

    return locate(path).exists()
