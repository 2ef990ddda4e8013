"""DeepSpeed checkpoints inside Kiln checkpoints.

Layout (one Kiln checkpoint directory, committed by its manifest like any other)::

    deepspeed/state/...             the engine's own files (every rank's ZeRO partitions, loss scale, ...)
    model.safetensors + model.json  the full module weights (gathered under ZeRO-3), for framework.checkpoint.consolidate
    trainer.*, rank-{r}.*           Kiln's trainer state (loop, schedulers, callbacks) and per-rank RNG/data

The engine writes its files with ``torch.save``; they are loaded back with ``weights_only=True`` and an
allow-list of the few DeepSpeed classes they hold, so loading never unpickles arbitrary objects, and only
after the manifest's checksums matched.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from strategies.deepspeed import DeepSpeedStrategy

DS_DIR = "deepspeed"
TAG = "state"
LAYOUT = "full"  # model.* holds the full weights, so any Kiln reader can take them
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")
_DISPATCHER_PREFIX = "module."  # the engine wraps a _StepDispatcher whose child is the module


class SafeCheckpointEngine:
    """DeepSpeed's torch checkpoint engine with a restricted unpickler for loading."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        if scoped is None:
            torch.serialization.add_safe_globals(_allowed_globals())
            return torch.load(path, map_location=map_location, weights_only=True)
        with scoped(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _allowed_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# ---- module state ------------------------------------------------------------------------------------
def full_state_dict(strategy: DeepSpeedStrategy) -> dict[str, Any]:
    """Full module weights: the module's own under ZeRO-1/2, gathered layer by layer under ZeRO-3.

    Under ZeRO-3 this is collective and only rank 0 gets the weights (others get {}).
    """
    engine = strategy.engine
    if engine is None or not engine.zero_optimization_partition_weights():
        return strategy.module.state_dict()
    gathered = engine._zero3_consolidated_16bit_state_dict()
    if gathered is None:
        return {}
    return {key[len(_DISPATCHER_PREFIX):]: value for key, value in gathered.items()}


def load_full_state_dict(strategy: DeepSpeedStrategy, state_dict: dict[str, Any], strict: bool) -> None:
    """Load full weights; under ZeRO-3 rank 0 loads them into gathered parameters, which are re-sharded."""
    engine = strategy.engine
    if engine is None or not engine.zero_optimization_partition_weights():
        strategy.module.load_state_dict(state_dict, strict=strict)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(strategy.module.parameters()), modifier_rank=0):
        if strategy.is_global_zero:
            strategy.module.load_state_dict(state_dict, strict=strict)


# ---- save --------------------------------------------------------------------------------------------
def save_checkpoint(strategy: DeepSpeedStrategy, path: str, *, trainer_state: dict[str, Any],
                    rank_state: dict[str, Any], metadata: dict[str, Any], safe_serialization: bool,
                    on_committed: Callable[[], None] | None) -> None:
    """Collective: every rank writes its engine files, rank 0 the weights and Kiln's trainer state."""
    engine = strategy.engine
    token = strategy._new_token()
    states = strategy._checkpoint_states(trainer_state, rank_state, None)
    has_engine_state = engine is not None and engine.optimizer is not None

    def write_engine_files(staging: Any) -> list:
        return _write_engine_files(strategy, staging) if has_engine_state else []

    strategy._write_checkpoint(path, token, states, {**metadata, "deepspeed_stage": strategy.stage},
                               safe_serialization, None, on_committed, layout=LAYOUT, extra_files=write_engine_files)


def _write_engine_files(strategy: DeepSpeedStrategy, staging: Any) -> list:
    from framework import checkpoint as io
    from framework.checkpoint.storage import locate

    root = locate(staging.dir)
    local_dir = os.path.join(root.path, DS_DIR) if root.is_local else tempfile.mkdtemp(prefix="kiln-ds-save-")
    try:
        os.makedirs(os.path.join(local_dir, TAG), exist_ok=True)
        strategy.engine.save_checkpoint(local_dir, tag=TAG, client_state={}, save_latest=False)  # ends in a barrier
        mine = sorted(rel for rel in _relative_files(local_dir) if _owner(rel) == strategy.global_rank)
        if not root.is_local:
            for folder in sorted({rel.rsplit("/", 1)[0] for rel in mine if "/" in rel}):
                root.join(f"{DS_DIR}/{folder}").makedirs()
            for rel in mine:
                with open(os.path.join(local_dir, *rel.split("/")), "rb") as src, \
                        root.join(f"{DS_DIR}/{rel}").open("wb") as dst:
                    shutil.copyfileobj(src, dst, 16 * 2**20)
        return io.describe_files(staging, [f"{DS_DIR}/{rel}" for rel in mine])
    finally:
        if not root.is_local:
            shutil.rmtree(local_dir, ignore_errors=True)


def _relative_files(directory: str) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(directory):
        for name in files:
            found.append(os.path.relpath(os.path.join(dirpath, name), directory).replace(os.sep, "/"))
    return found


def _owner(relpath: str) -> int:
    """The rank that wrote (and describes) an engine file: per-rank ZeRO files their rank, the rest rank 0."""
    match = _RANK_FILE.search(relpath.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else 0


# ---- load --------------------------------------------------------------------------------------------
def load_checkpoint(strategy: DeepSpeedStrategy, path: str, *, training: bool,
                    validate: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resume the engine from a DeepSpeed checkpoint, or (evaluation) load the weights of any Kiln checkpoint."""
    from framework import checkpoint as io

    manifest = io.read_manifest(path)
    shared = io.read_state(path, io.TRAINER, manifest)
    if validate is not None:
        validate(shared, None)
    has_engine_files = any(rel.startswith(f"{DS_DIR}/{TAG}/") for rel in manifest.files)
    engine = strategy.engine
    if training:
        if not has_engine_files or engine is None:
            raise ValueError(
                f"The checkpoint {io.redact(path)} was saved by strategy={manifest.strategy!r} and holds no DeepSpeed "
                "engine state, so training cannot resume from it under strategy='deepspeed'. Resume with the "
                "strategy that saved it, or start a new fit from its weights (framework.checkpoint.consolidate.load_weights).")
        if manifest.world_size != strategy.world_size:
            raise ValueError(
                f"The checkpoint {io.redact(path)} holds ZeRO partitions of {manifest.world_size} ranks, but this run "
                f"has {strategy.world_size}. Resume with {manifest.world_size} processes, or start a new fit from "
                "its weights (framework.checkpoint.consolidate.load_weights).")
        io.verify_checkpoint(path, manifest)  # the engine reads its files itself: check them first
        _load_engine_files(strategy, path, manifest)
    else:
        from framework.checkpoint.consolidate import read_model_state

        strategy.load_module_state_dict(read_model_state(path, manifest))
    return shared, strategy._read_rank_state(path, manifest)


def _load_engine_files(strategy: DeepSpeedStrategy, path: str, manifest: Any) -> None:
    from framework.checkpoint.storage import locate

    root = locate(path)
    if root.is_local:
        _engine_load(strategy, os.path.join(root.path, DS_DIR))
        return
    local_dir = tempfile.mkdtemp(prefix="kiln-ds-load-")
    try:
        for rel in manifest.files:
            if rel.startswith(f"{DS_DIR}/"):
                target = os.path.join(local_dir, *rel[len(DS_DIR) + 1:].split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with root.join(rel).open("rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 * 2**20)
        _engine_load(strategy, local_dir)
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def _engine_load(strategy: DeepSpeedStrategy, directory: str) -> None:
    load_path, _ = strategy.engine.load_checkpoint(directory, tag=TAG, load_module_strict=True,
                                                   load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load its checkpoint files from {directory}/{TAG}.")
