"""What a Trainer checkpoint holds, and putting it back.

The Trainer's part of a checkpoint is plain state (the FitLoop's progress, schedulers, precision/scaler,
callback states, the DataModule's state, data position, RNG); the Strategy writes it together with the
model and optimizer state in its own layout (``Strategy.save_checkpoint``/``load_checkpoint``), so this
module never asks which strategy is running.

``on_save_checkpoint``/``on_load_checkpoint`` hooks receive a dict with Lightning's keys (``state_dict``,
``epoch``, ``global_step``, ``optimizer_states``, ``lr_schedulers``, ``hyper_parameters``, ``callbacks``,
``loops``); keys a hook adds are stored as data (tensors, numbers, strings, lists, dicts — never pickled)
and handed back on load.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from framework.trainer import Trainer



def trainer_state(t: Trainer) -> dict[str, Any]:
    """Shared (rank-0) state: everything but model, optimizers and per-rank state."""
    from framework.hparams_codec import hparams_for_checkpoint

    datamodule = t.datamodule
    return {
        "loop": t.fit_loop.state_dict(),
        "schedulers": [config.scheduler.state_dict() for config in t.lr_scheduler_configs],
        "precision": t.precision_plugin.state_dict(),
        "callbacks": _callback_states(t, per_rank=False),
        **hparams_for_checkpoint(t.module, datamodule),
        **({type(datamodule).__qualname__: datamodule.state_dict()} if datamodule is not None else {}),
    }


def rank_state(t: Trainer) -> dict[str, Any]:
    """This rank's own state: per-rank callbacks (RNG) and the data position of its shard."""
    return {
        "callbacks": _callback_states(t, per_rank=True),
        # Each rank's own running sums; they only mean something at the same world size.
        "metrics": {"world_size": t.world_size, "state": t._metrics.state_dict()} if t.stage == "fit" else None,
        "data": t.fit_loop.data_state() if t.stage == "fit" else None,
    }


def _callback_states(t: Trainer, per_rank: bool) -> dict[str, Any]:
    """Non-empty callback states (as in Lightning, a callback with nothing to save is not called on load)."""
    states = {}
    for cb in t.callbacks:
        if cb.per_rank_state == per_rank:
            state = cb.state_dict()
            if state:
                states[cb.state_key] = state
    return states


def save_trainer_checkpoint(t: Trainer, path: str, *, weights_only: bool = False, safe_serialization: bool = True,
                            writer: Any = None, on_committed: Callable[[], None] | None = None) -> None:
    """Collective save of the whole training state to ``path``; ``writer`` makes it asynchronous."""
    from framework.checkpoint.storage import redact
    from framework.pitfalls import check_collective_call

    # Every rank must be here: a rank-0-only call fails with a clear error instead of hanging or corrupting.
    check_collective_call(t.strategy, f"trainer.save_checkpoint({redact(path)!r}) at global_step {t.global_step}")
    if t.stage == "fit" and not t.sync_gradients:
        warnings.warn(f"Saving a checkpoint inside a gradient accumulation window (after batch {t.batch_idx}): the "
                      "gradients accumulated so far are not saved, so resuming it will not reproduce this run. "
                      "Save when trainer.sync_gradients is True (ModelCheckpoint does).", stacklevel=3)
    state = trainer_state(t)
    state["user"] = _run_save_hooks(t, state)
    if weights_only:
        state = {key: value for key, value in state.items() if key not in ("schedulers", "precision", "callbacks")}
    metadata = {"epoch": t.current_epoch, "global_step": t.global_step, "kiln_stage": t.stage,
                "weights_only": weights_only}
    t.strategy.save_checkpoint(path, trainer_state=state, rank_state=rank_state(t), metadata=metadata,
                               optimizers=[] if weights_only else t.optimizers, safe_serialization=safe_serialization,
                               writer=writer, on_committed=on_committed)


def _run_save_hooks(t: Trainer, state: dict[str, Any]) -> dict[str, Any]:
    """The Lightning-shaped dict for ``on_save_checkpoint`` hooks; returns the keys they added."""
    hooks = t.hooks
    if hooks is None or not hooks.overridden("on_save_checkpoint"):
        return {}
    view = lightning_view(t, state)
    reserved = set(view)
    hooks.both("on_save_checkpoint", view)
    changed = sorted(reserved & view.touched) + sorted(reserved - set(view))
    if changed:
        raise ValueError(f"on_save_checkpoint replaced or removed {changed}: Kiln writes these through the strategy "
                         "(sharded, checksummed), so change the module or optimizer before saving instead; add your "
                         "own keys to the dict to store extra data.")
    return {key: view[key] for key in view if key not in reserved}


class CheckpointView(dict):
    """The checkpoint dict hooks see. ``state_dict`` and ``optimizer_states`` are built when first read (a full
    gather under FSDP/DeepSpeed: a hook that only adds keys costs nothing); ``touched`` records reserved keys a
    hook assigned."""

    def __init__(self, items: dict[str, Any], lazy: dict[str, Any]) -> None:
        super().__init__(items)
        self._lazy = lazy
        for key in lazy:
            super().__setitem__(key, None)
        self.reserved = set(self)
        self.touched: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        if key in self._lazy:
            super().__setitem__(key, self._lazy.pop(key)())
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self._lazy.pop(key, None)
        if key in self.reserved:
            self.touched.add(key)
        super().__setitem__(key, value)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> Any:
        return [self[key] for key in self]

    def items(self) -> Any:
        return [(key, self[key]) for key in self]


def lightning_view(t: Trainer, state: dict[str, Any], model_state: dict[str, Any] | None = None,
                   optimizer_states: list[Any] | None = None) -> CheckpointView:
    """The checkpoint as Lightning's hooks see it (model and optimizer states are references, not copies)."""
    loop = state.get("loop") or {}
    view = {
        "epoch": loop.get("epoch", t.current_epoch),
        "global_step": loop.get("global_step", t.global_step),
        "pytorch-lightning_version": "2.5 (kiln)",
        "loops": {"fit_loop": state.get("loop", {})},
        "callbacks": dict(state.get("callbacks", {})),
        "lr_schedulers": list(state.get("schedulers", [])),
    }
    lazy = {"state_dict": (lambda: model_state) if model_state is not None else t.strategy.module_state_dict,
            "optimizer_states": (lambda: optimizer_states) if optimizer_states is not None else (
                lambda: [t.strategy.optimizer_state_dict(o) for o in t.optimizers])}
    for key in ("hyper_parameters", "hparams_name", "datamodule_hyper_parameters", "datamodule_hparams_name"):
        if key in state:
            view[key] = state[key]
    if t.datamodule is not None:
        name = type(t.datamodule).__qualname__
        view[name] = state.get(name, {})
    return CheckpointView(view, lazy)


# ---- restore -------------------------------------------------------------------------------------------------
def resolve_ckpt_path(t: Trainer, ckpt_path: str) -> str | None:
    """A path/URL as given; "last": the newest complete checkpoint; "best": the checkpoint callback's best."""
    if ckpt_path == "best":
        from callbacks.checkpoint_naming import resolve_best

        return resolve_best(t, t.stage or "fit")
    if ckpt_path != "last":
        return str(ckpt_path)
    candidates = _last_candidates(t)
    return candidates[0] if candidates else None


def _last_candidates(t: Trainer) -> list[str]:
    """Complete checkpoints of the checkpoint callback's dirpath, newest first (warns when there are none)."""
    from framework.checkpoint import list_checkpoints, redact
    from framework.checkpoint.storage import join_path

    callback = t.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None) or join_path(t.default_root_dir, "checkpoints")
    found = t.strategy.broadcast([m.path for m in list_checkpoints(dirpath)] if t.is_global_zero else None)
    if not found:
        warnings.warn(f'ckpt_path="last" found no complete checkpoint under {redact(dirpath)}; starting from '
                      "scratch.", stacklevel=5)
    return found


def _load_last(t: Trainer, optimizers: Any) -> tuple[str, Any] | None:
    """Load the newest checkpoint that loads: a damaged one (a file whose size or checksum differs from its
    manifest) is skipped with a warning, on every rank alike. An intact one that cannot be loaded (unsafe,
    incompatible) is an error; so is every checkpoint being damaged."""
    from framework.checkpoint import CheckpointDamaged

    error: CheckpointDamaged | None = None
    # Sharded loads are collective: a rank that fails inside one cannot be skipped past.
    can_skip = t.world_size == 1 or not t.strategy.is_sharded
    for path in _last_candidates(t):
        try:
            loaded = t.strategy.load_checkpoint(path, optimizers=optimizers,
                                                validate=restore_validator(t, path, optimizers is not None))
        except CheckpointDamaged as exc:
            if not can_skip:
                raise
            error, loaded = exc, None
            warnings.warn(f'ckpt_path="last": skipping damaged {exc}', stacklevel=5)
        if (loaded is not None) if t.world_size == 1 else t.strategy.reduce_boolean_decision(loaded is not None):
            return path, loaded
    if error is not None:
        raise error
    return None


def restore_trainer_checkpoint(t: Trainer, ckpt_path: str, *, training: bool) -> str | None:
    """Load a checkpoint into the module (and, when training, optimizers, schedulers, loop and callbacks);
    returns the path that was loaded (None when "last" found nothing)."""
    optimizers = t.optimizers if training else None
    if ckpt_path == "last":
        found = _load_last(t, optimizers)
        if found is None:
            return None
        path, (shared, own) = found
    else:
        path = resolve_ckpt_path(t, ckpt_path)
        shared, own = t.strategy.load_checkpoint(path, optimizers=optimizers,
                                                 validate=restore_validator(t, path, training))
    hooks = t.hooks
    view = None
    if hooks is not None and hooks.overridden("on_load_checkpoint"):
        view = lightning_view(t, shared, optimizer_states=shared.get("optimizers", []))
        view.update(shared.get("user") or {})
        hooks.module_hook("on_load_checkpoint", view)  # Lightning's order: module, DataModule, callbacks
    if t.datamodule is not None and shared.get(type(t.datamodule).__qualname__):
        t.datamodule.load_state_dict(shared[type(t.datamodule).__qualname__])
    if view is not None:
        hooks.callbacks("on_load_checkpoint", view)
    states = {**shared.get("callbacks", {}), **(own.get("callbacks") or {})}
    for cb in t.callbacks:
        if cb.state_key in states:
            cb.load_state_dict(states[cb.state_key])
    if training:
        _restore_training_state(t, shared, own)
    return path


def _restore_training_state(t: Trainer, shared: dict[str, Any], own: dict[str, Any]) -> None:
    schedulers = shared.get("schedulers", [])
    t.fit_loop.load_state_dict(shared["loop"])
    # The data position is applied when the training loader exists; on another number of processes it is mapped
    # there (framework.reshard) so that the epoch goes on with exactly the samples not seen yet.
    t.fit_loop.defer_data_state(own.get("data"), shared.get("callbacks", {}).get(t.accumulation.state_key))
    metrics = own.get("metrics")
    if metrics and metrics.get("world_size") == t.world_size:
        t._metrics.load_state_dict(metrics["state"], t.module, resume_mid_epoch=not shared["loop"]["epoch_finished"])
    for config, state in zip(t.lr_scheduler_configs, schedulers):
        config.scheduler.load_state_dict(state)
    t.precision_plugin.load_state_dict(shared.get("precision", {}))


# ---- checking a checkpoint against the run before anything is changed ------------------------------------------
def _check_epoch_limit(t: Trainer, shared: dict[str, Any]) -> None:
    """Lightning's refusal of a checkpoint past ``max_epochs`` (its current_epoch: the next epoch to run, once the
    saved one finished); raised before anything is loaded."""
    from framework.exceptions import MisconfigurationException

    loop = shared.get("loop") or {}
    epoch = int(loop.get("epoch", 0)) + (1 if loop.get("epoch_finished") else 0)
    if epoch > t.max_epochs:
        raise MisconfigurationException(
            f"You restored a checkpoint with current_epoch={epoch}, but you have set Trainer(max_epochs="
            f"{t.max_epochs}): the checkpoint is past the end of this run, and nothing was loaded. Set max_epochs "
            f"to at least {epoch} (or -1 for no limit) to train on from it.")


def restore_validator(t: Trainer, path: str, training: bool) -> Callable[[dict[str, Any], dict[str, Any] | None], None]:
    """``validate(trainer_state, model_state)`` for ``Strategy.load_checkpoint``: every difference between the
    checkpoint and this run that would fail (or silently mis-load) halfway is reported in one error, while the
    module, optimizers and Trainer are still untouched."""
    from framework.checkpoint.storage import redact

    def validate(shared: dict[str, Any], model_state: dict[str, Any] | None) -> None:
        if training:
            _check_epoch_limit(t, shared)
        problems = _module_differences(t.module, model_state) if model_state is not None else []
        if training:
            problems += _training_differences(t, shared)
        if problems:
            raise ValueError(
                f"Cannot resume from {redact(path)}: it does not match this run, and nothing was loaded:\n  - "
                + "\n  - ".join(problems) + "\nResume with the module, configure_optimizers() and precision that "
                "wrote it; or, to start a new fit from its weights only, build the module with "
                "TrainModule.load_from_checkpoint(path, strict=False) and fit without ckpt_path.")

    return validate


def _module_differences(module: Any, saved: dict[str, Any]) -> list[str]:
    current = module.state_dict()
    problems = []
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing:
        problems.append(f"the module has {len(missing)} tensor(s) the checkpoint lacks: {_some(missing)}")
    if unexpected:
        problems.append(f"the checkpoint has {len(unexpected)} tensor(s) the module lacks: {_some(unexpected)}")
    shapes = [f"{k} {tuple(saved[k].shape)} != {tuple(current[k].shape)}" for k in sorted(set(saved) & set(current))
              if hasattr(saved[k], "shape") and hasattr(current[k], "shape") and saved[k].shape != current[k].shape]
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) differ in shape (saved != module): {_some(shapes)}")
    return problems


def _training_differences(t: Trainer, shared: dict[str, Any]) -> list[str]:
    problems = []
    if "loop" not in shared:
        problems.append("it holds no training progress (saved with weights_only=True)")
    schedulers = shared.get("schedulers", [])
    if len(schedulers) != len(t.lr_scheduler_configs):
        problems.append(f"it has {len(schedulers)} LR scheduler(s), configure_optimizers() returned "
                        f"{len(t.lr_scheduler_configs)}")
    saved_scaler = bool((shared.get("precision") or {}).get("scaler"))
    has_scaler = getattr(t.precision_plugin, "scaler", None) is not None
    if saved_scaler != has_scaler:
        problems.append(f"it was saved {'with' if saved_scaler else 'without'} an fp16 loss scaler, this run's "
                        f"precision={t.precision!r} has {'one' if has_scaler else 'none'}")
    saved = shared.get("optimizers")
    if saved is not None:
        if len(saved) != len(t.optimizers):
            problems.append(f"it has {len(saved)} optimizer state(s), configure_optimizers() returned {len(t.optimizers)}")
        else:
            problems += [p for i, (opt, state) in enumerate(zip(t.optimizers, saved))
                         if (p := _optimizer_difference(i, opt, state))]
    return problems


def _optimizer_difference(index: int, optimizer: Any, state: Any) -> str | None:
    """Load the saved state into a throwaway optimizer of the same class over the same parameters: whatever torch
    would refuse (another class's state, other parameter groups) is found without touching the real one."""
    import torch

    if type(optimizer).load_state_dict is not torch.optim.Optimizer.load_state_dict or not isinstance(state, dict):
        return None  # a wrapped or sharded optimizer (DeepSpeed, FSDP) checks its own state when it loads
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
              for g in optimizer.param_groups]
    try:
        probe = type(optimizer)(groups)
        probe.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any refusal is reported with the optimizer's name
        saved_keys = sorted({k for s in (state.get("state") or {}).values() if isinstance(s, dict) for k in s})
        return (f"optimizer {index} is {type(optimizer).__name__}, and its saved state (keys {saved_keys}) does "
                f"not load into it ({type(exc).__name__}: {exc})")
    return None


def _some(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
