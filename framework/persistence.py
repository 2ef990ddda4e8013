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
            "validated": t._validated_at == (t.current_epoch, t._batches_done),
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
    from framework.checkpoint.storage import redact
    from framework.pitfalls import check_collective_call

    # Every rank must be here: a rank-0-only call fails with a clear error instead of hanging or corrupting.
    check_collective_call(t.strategy, f"trainer.save_checkpoint({redact(path)!r}) at global_step {t.global_step}")
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
    candidates = _last_candidates(t)
    return candidates[0] if candidates else None


def _last_candidates(t: Trainer) -> list[str]:
    """Complete checkpoints of the checkpoint callback's dirpath, newest first (warns when there are none)."""
    from framework.checkpoint import list_checkpoints, redact

    callback = t.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None) or _join(t.default_root_dir, "checkpoints")
    found = t.strategy.broadcast([m.path for m in list_checkpoints(dirpath)] if t.is_global_zero else None)
    if not found:
        warnings.warn(f'ckpt_path="last" found no complete checkpoint under {redact(dirpath)}; starting from '
                      "scratch.", stacklevel=4)
    return found


def _load_last(t: Trainer, optimizers: Any) -> tuple[str, Any] | None:
    """Load the newest checkpoint that loads: a damaged one (a file whose size or checksum differs from its
    manifest) is skipped with a warning, on every rank alike. An intact one that cannot be loaded (unsafe,
    incompatible) is an error; so is every checkpoint being damaged (a failed load may have changed the model
    already, so starting from scratch would not be clean)."""
    from framework.checkpoint import CheckpointDamaged

    error: CheckpointDamaged | None = None
    # Sharded loads are collective: a rank that fails inside one cannot be skipped past.
    can_skip = t.world_size == 1 or not t.strategy.is_sharded
    for path in _last_candidates(t):
        try:
            loaded = t.strategy.load_checkpoint(path, optimizers=optimizers)
        except CheckpointDamaged as exc:
            if not can_skip:
                raise
            error, loaded = exc, None
            warnings.warn(f'ckpt_path="last": skipping damaged {exc}', stacklevel=4)
        if (loaded is not None) if t.world_size == 1 else t.strategy.reduce_boolean_decision(loaded is not None):
            return path, loaded
    if error is not None:
        raise error
    return None


def restore_trainer_checkpoint(t: Trainer, ckpt_path: str, *, training: bool) -> None:
    """Load a checkpoint into the module (and, when training, optimizers, schedulers, loop and callbacks)."""
    optimizers = t.optimizers if training else None
    if ckpt_path == "last":
        found = _load_last(t, optimizers)
        if found is None:
            return
        path, (shared, own) = found
    else:
        path = str(ckpt_path)
        shared, own = t.strategy.load_checkpoint(path, optimizers=optimizers)
    if training:
        _restore_training_state(t, shared, own)
    t._call_hooks("on_load_checkpoint", shared)


def _restore_training_state(t: Trainer, shared: dict[str, Any], own: dict[str, Any]) -> None:
    from framework.reshard import reshard_resume

    # On another number of processes the position and the accumulation are mapped so that the epoch goes on
    # with exactly the samples not seen yet, at the saved global batch (rank 0's data state is the reference).
    loop, data = reshard_resume(shared["loop"], own.get("data"), t.strategy.broadcast(own.get("data")),
                                feed=getattr(t, "_train_feed", None), accumulation=t._accumulation,
                                saved_accumulation=shared.get("callbacks", {}).get(t._accumulation.state_key))
    t.global_step = int(loop["global_step"])
    t.skipped_steps = int(loop["skipped_steps"])
    if loop["epoch_finished"]:
        t.current_epoch, t._resume_batch = int(loop["epoch"]) + 1, 0
    else:
        t.current_epoch, t._resume_batch = int(loop["epoch"]), int(loop["batches_done"])
        t._resume_validation_pending = not loop.get("validated", False)
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
    if feed is not None and data:
        feed.load_state_dict(data)


def _per_rank(callback: Any) -> bool:
    return bool(getattr(callback, "per_rank_state", False))


def _join(base: str, name: str) -> str:
    import os

    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)
