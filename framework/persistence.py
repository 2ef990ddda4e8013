"""What a Trainer checkpoint holds, and putting it back.

The Trainer's part of a checkpoint is plain state (loop progress, schedulers, precision/scaler,
callback states, data position, RNG); the Strategy writes it together with the model and optimizer
state in its own layout (``Strategy.save_checkpoint``/``load_checkpoint``), so this module never asks
which strategy is running.

Loop progress records where the next batch comes from: ``epoch`` and ``batches_done`` (batches of that
epoch already trained), and whether the epoch's end-of-epoch work already ran (``epoch_finished``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from framework.trainer import Trainer


def trainer_state(t: Trainer) -> dict[str, Any]:
    """Shared (rank-0) state: everything but model, optimizers and per-rank state."""
    return {
        "loop": {
            "epoch": t.current_epoch,
            "batches_done": t._batches_done,
            "epoch_finished": t._epoch_finished,
            "global_step": t.global_step,
            "skipped_steps": t.skipped_steps,
        },
        "schedulers": [config.scheduler.state_dict() for config in t.lr_scheduler_configs],
        "precision": t.precision_plugin.state_dict(),
        "callbacks": {cb.state_key: cb.state_dict() for cb in t.callbacks if not _per_rank(cb)},
    }


def rank_state(t: Trainer) -> dict[str, Any]:
    """This rank's own state: per-rank callbacks (RNG) and the data position of its shard."""
    feed = getattr(t, "_train_feed", None)
    return {
        "callbacks": {cb.state_key: cb.state_dict() for cb in t.callbacks if _per_rank(cb)},
        "data": feed.state_dict() if feed is not None and t.stage == "fit" else None,
    }


def save_trainer_checkpoint(t: Trainer, path: str, *, safe_serialization: bool = True, writer: Any = None,
                            on_committed: Callable[[], None] | None = None) -> None:
    """Collective save of the whole training state to ``path``; ``writer`` makes it asynchronous."""
    if t.stage == "fit" and not t.sync_gradients:
        warnings.warn(f"Saving a checkpoint inside a gradient accumulation window (after batch {t._batch_idx}): the "
                      "gradients accumulated so far are not saved, so resuming it will not reproduce this run. "
                      "Save when trainer.sync_gradients is True (ModelCheckpoint does).", stacklevel=3)
    checkpoint = trainer_state(t)
    t._call_hooks("on_save_checkpoint", checkpoint)
    metadata = {"epoch": t.current_epoch, "global_step": t.global_step, "kiln_stage": t.stage}
    t.strategy.save_checkpoint(path, trainer_state=checkpoint, rank_state=rank_state(t), metadata=metadata,
                               optimizers=t.optimizers, safe_serialization=safe_serialization, writer=writer,
                               on_committed=on_committed)


def resolve_ckpt_path(t: Trainer, ckpt_path: str) -> str | None:
    """A path/URL as given, or for ``"last"`` the newest complete checkpoint of the checkpoint callback."""
    if ckpt_path != "last":
        return str(ckpt_path)
    from framework.checkpoint import find_last

    callback = t.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None) or _join(t.default_root_dir, "checkpoints")
    found = t.strategy.broadcast(find_last(dirpath) if t.is_global_zero else None)
    if found is None:
        warnings.warn(f'ckpt_path="last" found no complete checkpoint under {dirpath}; starting from scratch.',
                      stacklevel=3)
    return found


def restore_trainer_checkpoint(t: Trainer, ckpt_path: str, *, training: bool) -> None:
    """Load a checkpoint into the module (and, when training, optimizers, schedulers, loop and callbacks)."""
    path = resolve_ckpt_path(t, ckpt_path)
    if path is None:
        return
    shared, own = t.strategy.load_checkpoint(path, optimizers=t.optimizers if training else None)
    if training:
        _restore_training_state(t, shared, own)
    t._call_hooks("on_load_checkpoint", shared)


def _restore_training_state(t: Trainer, shared: dict[str, Any], own: dict[str, Any]) -> None:
    loop = shared["loop"]
    t.global_step = int(loop["global_step"])
    t.skipped_steps = int(loop["skipped_steps"])
    if loop["epoch_finished"]:
        t.current_epoch, t._resume_batch = int(loop["epoch"]) + 1, 0
    else:
        t.current_epoch, t._resume_batch = int(loop["epoch"]), int(loop["batches_done"])
    schedulers = shared.get("schedulers", [])
    if len(schedulers) != len(t.lr_scheduler_configs):
        raise ValueError(f"The checkpoint has {len(schedulers)} LR scheduler(s) but configure_optimizers() returned "
                         f"{len(t.lr_scheduler_configs)}; resume with the same optimizer/scheduler setup.")
    for config, state in zip(t.lr_scheduler_configs, schedulers):
        config.scheduler.load_state_dict(state)
    t.precision_plugin.load_state_dict(shared.get("precision", {}))
    states = {**shared.get("callbacks", {}), **(own.get("callbacks") or {})}
    for cb in t.callbacks:
        if cb.state_key in states:
            cb.load_state_dict(states[cb.state_key])
    feed = getattr(t, "_train_feed", None)
    if feed is not None and own.get("data"):
        feed.load_state_dict(own["data"])


def _per_rank(callback: Any) -> bool:
    return bool(getattr(callback, "per_rank_state", False))


def _join(base: str, name: str) -> str:
    import os

    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)
