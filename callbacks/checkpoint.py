"""ModelCheckpoint: Lightning's arguments, attributes and saving rules on Kiln's atomic checkpoints.

Each checkpoint is one directory under ``dirpath`` (default ``<default_root_dir>/checkpoints``) named like
Lightning's file (``epoch=0-step=10.ckpt/``), complete once its manifest is committed. Saving is collective;
what a save replaces (the previous newest, the k-th best, the previous ``last``) is deleted on rank 0 only
after the new one has committed (for ``async_save=True``: when its background write finishes).
``save_last=True`` writes a full ``last.ckpt``; ``save_last="link"`` makes it a relative symlink to the newest
checkpoint (local folders only), switched atomically. Kiln's extras: ``total_limit=k`` keeps the k newest (the
best is always kept), ``safe_serialization``, ``async_save``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import typing
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch

from callbacks import checkpoint_naming as naming
from callbacks.base import Callback
from callbacks.checkpoint_keeping import CheckpointKeeping
from framework.exceptions import MisconfigurationException

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

log = logging.getLogger(__name__)


class ModelCheckpoint(CheckpointKeeping, Callback):
    """Save checkpoints periodically and keep the best ``save_top_k`` by ``monitor`` (Lightning 2.5's contract)."""

    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ".ckpt"
    STARTING_VERSION = 1

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = None,
                 verbose: bool = False, save_last: bool | Literal["link"] | None = None, save_top_k: int = 1,
                 save_on_exception: bool = False, save_weights_only: bool = False, mode: str = "min",
                 auto_insert_metric_name: bool = True, every_n_train_steps: int | None = None,
                 train_time_interval: timedelta | None = None, every_n_epochs: int | None = None,
                 save_on_train_epoch_end: bool | None = None, enable_version_counter: bool = True, *,
                 total_limit: int | None = None, safe_serialization: bool = True, async_save: bool = False) -> None:
        if mode not in ("min", "max"):
            raise MisconfigurationException(f"`mode` can be min, max but got {mode} (ModelCheckpoint(mode=...)).")
        if save_last not in (None, True, False, "link"):
            raise ValueError(f"ModelCheckpoint(save_last={save_last!r}) is not valid; use None/False, True or 'link'.")
        _check_int("save_top_k", save_top_k, minimum=-1)
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs),
                            ("total_limit", total_limit)):
            if value is not None:
                _check_int(name, value, minimum=1 if name == "total_limit" else 0)
        if train_time_interval is not None and not isinstance(train_time_interval, timedelta):
            raise TypeError(f"ModelCheckpoint(train_time_interval={train_time_interval!r}) must be a "
                            "datetime.timedelta, e.g. timedelta(minutes=30).")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"ModelCheckpoint(monitor={monitor!r}) must be a logged metric name or None.")
        self.monitor = monitor
        self.verbose = verbose
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_on_exception = save_on_exception
        self.save_weights_only = save_weights_only
        self.auto_insert_metric_name = auto_insert_metric_name
        self.mode = mode
        self.kth_value = torch.tensor(math.inf if mode == "min" else -math.inf)
        self.total_limit = total_limit
        self.safe_serialization = safe_serialization
        self.async_save = async_save
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self._enable_version_counter = enable_version_counter
        if every_n_train_steps is None and every_n_epochs is None and train_time_interval is None:
            every_n_epochs, every_n_train_steps = 1, 0
        self._every_n_epochs = every_n_epochs or 0
        self._every_n_train_steps = every_n_train_steps or 0
        self._train_time_interval = train_time_interval
        triggers = (self._every_n_train_steps >= 1) + (self._every_n_epochs >= 1) + (train_time_interval is not None)
        if triggers > 1:
            raise MisconfigurationException(
                f"Combination of parameters every_n_train_steps={self._every_n_train_steps}, every_n_epochs="
                f"{self._every_n_epochs} and train_time_interval={train_time_interval} should be mutually exclusive. "
                "Use one ModelCheckpoint per schedule.")
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise MisconfigurationException(
                f"ModelCheckpoint(save_top_k={save_top_k}, monitor=None) is not a valid configuration. No quantity "
                "for top_k to track: pass monitor='<metric>', or total_limit=k to keep the k newest checkpoints.")
        naming.check_filename(filename, auto_insert_metric_name=auto_insert_metric_name,
                              join=self.CHECKPOINT_JOIN_CHAR, equals=self.CHECKPOINT_EQUALS_CHAR,
                              extension=self.FILE_EXTENSION)
        self.dirpath = naming.check_dirpath(dirpath or None)  # "" means "not given", as in Lightning
        self.filename = filename
        self.current_score: torch.Tensor | None = None
        self.best_k_models: dict[str, torch.Tensor] = {}
        self.kth_best_model_path = ""
        self.best_model_score: torch.Tensor | None = None
        self.best_model_path = ""
        self.last_model_path = ""
        self._last_global_step_saved = 0  # nothing to save before the first step
        self._last_checkpoint_saved = ""
        self._last_time_checked: float | None = None
        self._defer_save_until_validation = False
        self._validation_ran = self._warned_missing = False
        self._writer: Any = None
        self._reserve_pending = False  # async_save: snapshot buffers are reserved once the optimizer state exists

    # ---- Lightning's read-only views ----------------------------------------------------------------
    @property
    def every_n_epochs(self) -> int:
        return self._every_n_epochs

    @property
    def every_n_train_steps(self) -> int:
        return self._every_n_train_steps

    @property
    def train_time_interval(self) -> timedelta | None:
        return self._train_time_interval

    @property
    def state_key(self) -> str:
        key = {"monitor": self.monitor, "mode": self.mode, "every_n_train_steps": self._every_n_train_steps,
               "every_n_epochs": self._every_n_epochs, "train_time_interval": self._train_time_interval}
        return f"{type(self).__qualname__}{key!r}"

    # ---- hooks -----------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: TrainModule, stage: str) -> None:
        if self.dirpath is None:
            # Kiln differs from Lightning here: not under the logger's version folder, which changes every run,
            # so that ckpt_path="last" (preemption, elastic restarts) finds the previous run's checkpoints.
            self.dirpath = naming.join(str(trainer.default_root_dir), "checkpoints")
        if trainer.world_size > 1:
            self.dirpath = trainer.strategy.broadcast(self.dirpath)
        if self.save_last == "link" and not naming.is_local(self.dirpath):
            raise ValueError(f"`ModelCheckpoint(save_last='link')` is only supported for local file paths, got "
                             f"`dirpath={self.dirpath}`. Use save_last=True for remote storage.")
        self._validation_ran = self._warned_missing = False
        if stage == "fit" and trainer.is_global_zero:
            from framework.checkpoint import cleanup_stale
            from framework.checkpoint.storage import locate, redact

            # Leftovers of saves or deletions a crash cut short (never another process's running save).
            cleanup_stale(self.dirpath)
            if self.save_top_k != 0 and locate(self.dirpath).child_dirs():
                log.warning(f"Checkpoint directory {redact(self.dirpath)} exists and is not empty.")
        if self.async_save and self._writer is None:
            from framework.checkpoint import AsyncCheckpointWriter

            self._writer = AsyncCheckpointWriter()
        # Sharded strategies snapshot a gathered full state, not the local tensors a reservation would mirror.
        self._reserve_pending = self.async_save and not trainer.strategy.is_sharded

    def on_train_start(self, trainer: Trainer, pl_module: TrainModule) -> None:
        self._last_time_checked = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: TrainModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._reserve_pending and trainer.global_step >= 1:  # so the first async save is as quick as the rest
            self._reserve_pending = False
            self._writer.reserve(module=pl_module, optimizers=trainer.optimizers)
        n = self._every_n_train_steps
        if (n < 1 and self._train_time_interval is None) or not trainer.sync_gradients:
            return  # the default per-step path; inside an accumulation window global_step has not moved
        skip_batch = n < 1 or trainer.global_step % n != 0
        skip_time, now = True, 0.0
        if self._train_time_interval is not None:
            now = time.monotonic()
            last = self._last_time_checked
            skip_time = last is None or now - last < self._train_time_interval.total_seconds()
            if trainer.world_size > 1:  # clocks differ across ranks: rank 0 decides for all
                skip_time = trainer.strategy.broadcast(skip_time)
        if skip_batch and skip_time:
            return
        if not skip_time:
            self._last_time_checked = now
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True  # e.g. a validation metric not logged yet
            return
        if (self.monitor is not None and not self._should_save_on_train_epoch_end(trainer)
                and _is_last_batch(trainer, batch_idx) and _validation_follows(trainer)):
            self._defer_save_until_validation = True  # rank it by the coming validation's fresh metric
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: TrainModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer):
            candidates = self._monitor_candidates(trainer)
            if self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_validation_end(self, trainer: Trainer, pl_module: TrainModule) -> None:
        if not getattr(trainer, "sanity_checking", False):
            self._validation_ran = True
        if self._should_skip_saving_checkpoint(trainer) or self._should_save_on_train_epoch_end(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self._defer_save_until_validation:
            self._defer_save_until_validation = False
        elif not (self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0):
            self._save_last_checkpoint(trainer, candidates)
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_exception(self, trainer: Trainer, pl_module: TrainModule, exception: BaseException) -> None:
        if self.save_on_exception and not getattr(trainer, "fast_dev_run", False) and not getattr(
                trainer, "sanity_checking", False) and self._last_global_step_saved != trainer.global_step:
            self.wait(trainer, quiet=True)
            candidates = self._monitor_candidates(trainer)
            filepath = self.format_checkpoint_name(candidates)
            self._save_checkpoint(trainer, filepath)
            self._save_last_checkpoint(trainer, candidates)
            self.wait(trainer, quiet=True)
            log.info(f"An {type(exception).__name__} was raised with message: {exception}, saved checkpoint to "
                     f"{filepath}")
        self.wait(trainer, quiet=True)

    def on_train_end(self, trainer: Trainer, pl_module: TrainModule) -> None:
        if self.save_last and not self._last_checkpoint_saved and not getattr(trainer, "fast_dev_run", False):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_fit_end(self, trainer: Trainer, pl_module: TrainModule) -> None:
        self.wait(trainer)

    def teardown(self, trainer: Trainer, pl_module: TrainModule, stage: str) -> None:
        self.wait(trainer)

    # ---- when to save -----------------------------------------------------------------------------------
    def _should_skip_saving_checkpoint(self, trainer: Trainer) -> bool:
        return (bool(getattr(trainer, "fast_dev_run", False)) or trainer.stage != "fit"
                or bool(getattr(trainer, "sanity_checking", False))
                or self._last_global_step_saved == trainer.global_step)

    def _should_save_on_train_epoch_end(self, trainer: Trainer) -> bool:
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        if trainer.check_val_every_n_epoch != 1:
            return False
        counts = trainer.num_val_batches or []
        if not any(n is None or n > 0 for n in counts):
            return True
        return trainer.val_check_interval in (None, 1.0)

    # ---- Kiln: save now (preemption, nan_policy="stop") --------------------------------------------------
    def save_now(self, trainer: Trainer) -> str | None:
        """Save the current state now (collective), wait until it is committed and return its path.

        Used by preemption and ``nan_policy="stop"``: the checkpoint lands in ``dirpath`` (named by
        ``filename``, outside the top-k ranking, never rotated away), so ``ckpt_path="last"`` finds it.
        Under ``fast_dev_run`` nothing is saved (None), as for every other save.
        """
        if getattr(trainer, "fast_dev_run", False):
            return None
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved:
            self.wait(trainer)
            return self._last_checkpoint_saved
        self.wait(trainer)
        candidates = self._monitor_candidates(trainer)
        filepath = self._versioned(trainer, lambda ver: self.format_checkpoint_name(candidates, ver=ver))
        self._save_checkpoint(trainer, filepath)
        self._save_last_checkpoint(trainer, candidates)
        self.wait(trainer)
        return filepath

    def wait(self, trainer: Trainer | None = None, quiet: bool = False) -> None:
        """Block until a background save has committed; re-raise its error unless ``quiet`` (async_save only)."""
        if self._writer is not None:
            try:
                self._writer.wait()
            except Exception:
                if not quiet:
                    raise

    # ---- names ------------------------------------------------------------------------------------------
    def _format_checkpoint_name(self, filename: str | None, metrics: dict[str, Any], prefix: str | None = None,
                                auto_insert_metric_name: bool = True) -> str:
        """The name for ``metrics`` without version or extension (Lightning's helper, same signature)."""
        template = filename or "{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}"
        name = naming.format_template(template, metrics, auto_insert_metric_name=auto_insert_metric_name,
                                      equals=self.CHECKPOINT_EQUALS_CHAR)
        return self.CHECKPOINT_JOIN_CHAR.join([prefix, name]) if prefix is not None else name

    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None, ver: int | None = None,
                               prefix: str | None = None) -> str:
        """The checkpoint path for ``metrics`` (Lightning's naming: ``{epoch}`` → ``epoch=3``, ``-v1`` versions)."""
        template = filename or self.filename
        name = self._format_checkpoint_name(template, metrics, prefix, self.auto_insert_metric_name)
        if ver is not None:
            name = self.CHECKPOINT_JOIN_CHAR.join((name, f"v{ver}"))
        name = f"{name}{self.FILE_EXTENSION}"
        naming.check_name(name, what=f"ModelCheckpoint(filename={template!r})")
        return naming.join(self.dirpath, name) if self.dirpath else name

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        """Rank 0 points ``linkpath`` at ``filepath`` with a relative symlink (atomically); all ranks then meet."""
        if trainer.is_global_zero:
            naming.link_last(filepath, linkpath)
        trainer.strategy.barrier()

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        """Paths in dirpath named like a "last" checkpoint (``last``, ``last-v1``... with FILE_EXTENSION)."""
        from framework.checkpoint.storage import locate

        dirpath = self.dirpath or naming.join(str(trainer.default_root_dir), "checkpoints")
        pattern = re.compile(rf"^{re.escape(self.CHECKPOINT_NAME_LAST)}(-(\d+))?")
        loc = locate(dirpath)
        if not loc.exists():
            return set()
        if loc.is_local:
            entries = os.listdir(dirpath)
        else:
            entries = [info.rstrip("/").rsplit("/", 1)[-1] for info in loc.fs.ls(loc.path, detail=False)]
        local = naming.is_local(dirpath)
        return {os.path.normpath(naming.join(dirpath, name)) if local else naming.join(dirpath, name)
                for name in entries if name.endswith(self.FILE_EXTENSION)
                and pattern.match(name[:len(name) - len(self.FILE_EXTENSION)] if self.FILE_EXTENSION else name)}

    def to_yaml(self, filepath: str | None = None) -> None:
        """Write ``best_k_models`` (path → score) as YAML, to ``dirpath/best_k_models.yaml`` by default."""
        import yaml

        from framework.checkpoint.storage import locate

        data = {path: float(score) for path, score in self.best_k_models.items()}
        target = filepath if filepath is not None else naming.join(self.dirpath, "best_k_models.yaml")
        with locate(str(target)).open("wb") as f:
            f.write(yaml.safe_dump(data).encode())

    # ---- checkpointed state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Scores stay tensors, as in Lightning: their dtype and value come back exactly (safetensors, no pickle).
        def score(value: Any) -> torch.Tensor | None:
            return None if value is None else torch.as_tensor(value).detach().cpu().clone()

        return {"monitor": self.monitor, "best_model_score": score(self.best_model_score),
                "best_model_path": self.best_model_path, "current_score": score(self.current_score),
                "dirpath": self.dirpath, "best_k_models": {k: score(v) for k, v in self.best_k_models.items()},
                "kth_best_model_path": self.kth_best_model_path, "kth_value": score(self.kth_value),
                "last_model_path": self.last_model_path, "last_global_step_saved": self._last_global_step_saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def tensor(value: Any) -> torch.Tensor | None:  # numbers: checkpoints written before scores were tensors
            if value is None or isinstance(value, torch.Tensor):
                return value
            return torch.tensor(float(value))

        saved_dir = state_dict.get("dirpath", self.dirpath)
        if saved_dir == self.dirpath:
            self.best_model_score = tensor(state_dict.get("best_model_score"))
            self.current_score = tensor(state_dict.get("current_score"))
            self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
            if state_dict.get("kth_value") is not None:
                self.kth_value = tensor(state_dict["kth_value"])
            self.best_k_models = {str(k): tensor(v) for k, v in state_dict.get("best_k_models", {}).items()}
            self.last_model_path = state_dict.get("last_model_path", self.last_model_path)
            # the step of the checkpoint being resumed is not saved again (e.g. by the epoch end right after it)
            self._last_global_step_saved = int(state_dict.get("last_global_step_saved", 0))
        else:
            import warnings

            warnings.warn(f"The dirpath has changed from {saved_dir!r} to {self.dirpath!r}, therefore "
                          "`best_model_score`, `kth_best_model_path`, `kth_value`, `last_model_path` and "
                          "`best_k_models` won't be reloaded. Only `best_model_path` will be reloaded.", stacklevel=2)
        self.best_model_path = state_dict.get("best_model_path", self.best_model_path)


# Resolved types, not postponed strings, in the constructor's signature: tools that read it directly
# (jsonargparse, CLI parsers) then see the types Lightning's signature shows.
ModelCheckpoint.__init__.__annotations__.update(typing.get_type_hints(ModelCheckpoint.__init__))

def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MisconfigurationException(f"Invalid value for {name}={value!r}. Must be >= {minimum}, an int "
                                        f"(ModelCheckpoint({name}=...)).")


def _is_last_batch(trainer: Trainer, batch_idx: int) -> bool:
    total = trainer.num_training_batches
    return total is not None and batch_idx + 1 >= total


def _validation_follows(trainer: Trainer) -> bool:
    if not any(n is None or n > 0 for n in (trainer.num_val_batches or [])):
        return False
    every = trainer.check_val_every_n_epoch
    return every is not None and (trainer.current_epoch + 1) % every == 0
