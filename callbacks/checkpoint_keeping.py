"""What ModelCheckpoint keeps: Lightning's top-k ranking, "last", version counters, and Kiln's rotation.

A mixin of :class:`callbacks.checkpoint.ModelCheckpoint` (which owns the arguments, the hooks deciding
*when* to save, and the names). Whatever a save replaces — the previous newest, the k-th best, the
previous ``last`` — is deleted on rank 0 only after the new checkpoint has committed (its manifest is
written), so a crash never leaves fewer complete checkpoints than the rules promise.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any

import torch

from callbacks import checkpoint_naming as naming
from framework.exceptions import MisconfigurationException

if TYPE_CHECKING:
    from framework.trainer import Trainer

log = logging.getLogger("callbacks.checkpoint")


class CheckpointKeeping:
    """Top-k ranking and deletion-after-commit; expects ModelCheckpoint's attributes."""

    monitor: str | None
    mode: str
    save_top_k: int
    save_last: Any
    save_weights_only: bool
    safe_serialization: bool
    _writer: Any
    total_limit: int | None
    dirpath: str | None
    verbose: bool
    CHECKPOINT_NAME_LAST: str
    STARTING_VERSION: int

    def _monitor_candidates(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        candidates = dict(trainer.callback_metrics)
        epoch, step = candidates.get("epoch"), candidates.get("step")
        candidates["epoch"] = epoch.int() if isinstance(epoch, torch.Tensor) else torch.tensor(trainer.current_epoch)
        candidates["step"] = step.int() if isinstance(step, torch.Tensor) else torch.tensor(trainer.global_step)
        return candidates

    def _save_topk_checkpoint(self, trainer: Trainer, candidates: dict[str, torch.Tensor]) -> None:
        if self.save_top_k == 0:
            return
        if self.monitor is None:
            self._save_none_monitor_checkpoint(trainer, candidates)
            return
        if self.monitor not in candidates:
            message = (f"`ModelCheckpoint(monitor={self.monitor!r})` could not find the monitored key in the returned "
                       f"metrics: {list(candidates)}. HINT: Did you call `log({self.monitor!r}, value)` in the "
                       "`TrainModule`?")
            if self._validation_ran:
                raise MisconfigurationException(message)
            _warn_once(self, message)
            return
        current = candidates[self.monitor]
        if self.check_monitor_top_k(trainer, current):
            self._update_best_and_save(current, trainer, candidates)
        elif self.verbose:
            log.info(f"Epoch {int(candidates['epoch']):d}, global step {int(candidates['step']):d}: "
                     f"{self.monitor!r} was not in top {self.save_top_k}")

    def check_monitor_top_k(self, trainer: Trainer, current: torch.Tensor | None = None) -> bool:
        """Whether ``current`` earns a place among the best ``save_top_k`` (agreed by every rank)."""
        if current is None:
            return False
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        better = torch.lt if self.mode == "min" else torch.gt
        decision = bool(better(current.detach().cpu().float(), self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(decision) if trainer.world_size > 1 else decision

    def _update_best_and_save(self, current: torch.Tensor, trainer: Trainer,
                              candidates: dict[str, torch.Tensor]) -> None:
        k = len(self.best_k_models) + 1 if self.save_top_k == -1 else self.save_top_k
        doomed = None
        if len(self.best_k_models) == k and k > 0:
            doomed = self.kth_best_model_path
            self.best_k_models.pop(doomed)
        current = current.detach().cpu().float()
        if torch.isnan(current):  # a NaN score ranks last
            current = torch.tensor(math.inf if self.mode == "min" else -math.inf)
        filepath = self._versioned(trainer, lambda ver: self.format_checkpoint_name(candidates, ver=ver), doomed)
        self.current_score = current
        self.best_k_models[filepath] = current
        self._rerank(k)
        if self.verbose:
            log.info(f"Epoch {int(candidates['epoch']):d}, global step {int(candidates['step']):d}: {self.monitor!r} "
                     f"reached {float(current):0.5f} (best {float(self.best_model_score):0.5f}), saving model to "
                     f"{filepath!r} as top {k}")
        self._save_checkpoint(trainer, filepath, remove=[doomed] if doomed else [])

    def _rerank(self, k: int | None = None) -> None:
        if not self.best_k_models:
            self.kth_best_model_path, self.best_model_path, self.best_model_score = "", "", None
            return
        worst, best = (max, min) if self.mode == "min" else (min, max)
        if k is None or len(self.best_k_models) == k:
            self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)
        self.best_model_score = self.best_k_models[self.best_model_path]

    def _save_none_monitor_checkpoint(self, trainer: Trainer, candidates: dict[str, torch.Tensor]) -> None:
        filepath = self._versioned(trainer, lambda ver: self.format_checkpoint_name(candidates, ver=ver),
                                   self.best_model_path)
        previous, self.best_model_path = self.best_model_path, filepath
        drop = self.save_top_k == 1 and self.total_limit is None and previous
        self._save_checkpoint(trainer, filepath, remove=[previous] if drop else [])

    def _save_last_checkpoint(self, trainer: Trainer, candidates: dict[str, torch.Tensor]) -> None:
        if not self.save_last:
            return
        filepath = self._versioned(
            trainer, lambda ver: self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST, ver=ver),
            self.last_model_path)
        previous, self.last_model_path = self.last_model_path, filepath
        remove = [previous] if previous and previous != filepath else []
        if self.save_last == "link" and self._last_checkpoint_saved and self.save_top_k != 0:
            # Under async_save the target may still be writing: the link dangles (readers skip it) until the
            # target's atomic rename makes it appear complete.
            self._after_commit(trainer, self._last_checkpoint_saved, remove, link=filepath)
        else:
            self._save_checkpoint(trainer, filepath, remove=remove)

    def _versioned(self, trainer: Trainer, name_for: Any, reusable: str | None = None) -> str:
        """The formatted path, with ``-v1``, ``-v2``... while it names an existing checkpoint (not ``reusable``)."""
        filepath = name_for(None)
        if self._enable_version_counter:
            version = self.STARTING_VERSION
            while filepath != reusable and self.file_exists(filepath, trainer):
                filepath, version = name_for(version), version + 1
        return filepath

    def _save_checkpoint(self, trainer: Trainer, filepath: str, remove: list[str] | tuple = ()) -> None:
        # Recorded before writing: the checkpoint's own callback state already names it.
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        # A background save commits (and rotates, mutating state) later: finish it before snapshotting this one.
        self.wait(trainer)
        if self._writer is None and self.safe_serialization:
            # Lightning's call, argument for argument; a synchronous save has committed when it returns.
            trainer.save_checkpoint(filepath, self.save_weights_only)
            self._after_commit(trainer, filepath, list(remove))
            return
        trainer.save_checkpoint(filepath, self.save_weights_only, safe_serialization=self.safe_serialization,
                                writer=self._writer,
                                on_committed=lambda: self._after_commit(trainer, filepath, list(remove)))

    def _after_commit(self, trainer: Trainer, filepath: str, remove: list[str], link: str | None = None) -> None:
        """Once ``filepath`` is complete (maybe in the writer's thread): rank 0 links and deletes what it replaced."""
        if trainer.is_global_zero:
            if link is not None:
                naming.link_last(filepath, link)
            for path in remove:
                if self._should_remove_checkpoint(trainer, path, filepath):
                    _remove(path)
            if self.total_limit is not None:
                self._apply_total_limit()
            if link is None:  # Lightning tells loggers about saves, not links
                for logger in getattr(trainer, "loggers", ()):
                    if hasattr(logger, "after_save_checkpoint"):
                        logger.after_save_checkpoint(self)

    def _apply_total_limit(self) -> None:
        """Kiln's ``total_limit``: delete all but the newest k checkpoints of dirpath (best and last are kept too)."""
        from framework.checkpoint import list_checkpoints

        newest_first = [m.path for m in list_checkpoints(self.dirpath) if m.path != self.last_model_path]
        for path in newest_first[self.total_limit:]:
            if path == self.best_model_path:
                continue
            _remove(path)
            if self.best_k_models.pop(path, None) is not None:
                self._rerank()

    def _should_remove_checkpoint(self, trainer: Trainer, previous: str, current: str) -> bool:
        """Lightning's rule: not the one just written, not the one resumed from, only inside dirpath; Kiln adds:
        never one the callback still names (best, last, a top-k member)."""
        if previous == current or previous in self.best_k_models or previous in (self.best_model_path,
                                                                                   self.last_model_path):
            return False
        if not naming.is_local(previous):
            return True
        resumed = getattr(trainer, "ckpt_path", None)
        if resumed and os.path.abspath(str(resumed)) == os.path.abspath(previous):
            return False
        return os.path.dirname(os.path.abspath(previous)) == os.path.abspath(self.dirpath)

    def file_exists(self, filepath: str, trainer: Trainer) -> bool:
        """Whether ``filepath`` exists, as rank 0 sees it (broadcast, so every rank picks the same name)."""
        from framework.checkpoint.storage import locate

        exists = os.path.lexists(filepath) if naming.is_local(filepath) else locate(filepath).exists()
        return trainer.strategy.broadcast(exists) if trainer.world_size > 1 else exists


def _warn_once(callback: Any, message: str) -> None:
    import warnings

    if not callback._warned_missing:
        callback._warned_missing = True
        warnings.warn(message, stacklevel=3)


def _remove(path: str) -> None:
    from framework.checkpoint import remove_checkpoint

    try:  # force: finish deleting one whose manifest went first but whose files a crash left
        if naming.is_local(path) and os.path.islink(path):
            os.remove(path)
        else:
            remove_checkpoint(path, force=True)
    except FileNotFoundError:  # already gone: rankings restored from a checkpoint predate its rotation
        pass
