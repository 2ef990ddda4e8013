"""``read_checkpoint``: a Kiln checkpoint as the dict ``torch.load(path)`` gives for a Lightning ``.ckpt`` file.

A Kiln checkpoint is a directory (safetensors + JSON + a manifest), so ``torch.load`` cannot open it; code
ported from Lightning that inspects a checkpoint (``ckpt["state_dict"]``, ``ckpt["callbacks"][key]``,
``ckpt["epoch"]``) calls this instead. Nothing is unpickled and every file's checksum is verified.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from framework.hparams_codec import decode_hparams


def read_checkpoint(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    """The checkpoint at ``path`` (a directory or URL; ``<dirpath>/last`` and ``<dirpath>/best`` resolve as in
    ``load_from_checkpoint``) under Lightning's keys: ``epoch``, ``global_step``, ``state_dict``,
    ``optimizer_states``, ``lr_schedulers``, ``callbacks`` (keyed by ``state_key``), ``hyper_parameters`` and
    ``hparams_name`` (and the DataModule's), every key an ``on_save_checkpoint`` hook added, and ``loops``
    (Kiln's loop state under ``"fit_loop"``).

    ``state_dict`` is the full module state of any layout (sharded ones are consolidated). ``optimizer_states``
    is present when the checkpoint holds whole optimizer states (one process, DDP, FSDP ``state_dict_type=
    "full"``); sharded FSDP and DeepSpeed checkpoints keep them per rank, as Lightning's sharded checkpoints do.
    Tensors are read onto the CPU; ``map_location`` (a device) moves them.
    """
    from framework import checkpoint as io
    from framework.checkpoint.consolidate import read_model_state
    from framework.loading import _map_location, resolve_checkpoint_path

    device = _map_location(map_location)
    resolved = resolve_checkpoint_path(path)
    manifest = io.read_manifest(resolved)
    trainer = dict(io.read_state(resolved, io.TRAINER, manifest))
    callbacks = dict(trainer.get("callbacks") or {})
    if io.rank_state_name(0) in manifest.state_names():
        callbacks.update(io.read_state(resolved, io.rank_state_name(0), manifest).get("callbacks") or {})
    checkpoint: dict[str, Any] = {
        "epoch": manifest.metadata.get("epoch"),
        "global_step": manifest.metadata.get("global_step"),
        "pytorch-lightning_version": "2.5 (kiln)",
        "state_dict": read_model_state(resolved, manifest),
        "loops": {"fit_loop": trainer.get("loop")},
        "callbacks": callbacks,
        "lr_schedulers": list(trainer.get("schedulers") or []),
    }
    if "optimizers" in trainer:
        checkpoint["optimizer_states"] = list(trainer["optimizers"])
    for key, name in (("hyper_parameters", "hparams_name"), ("datamodule_hyper_parameters", "datamodule_hparams_name")):
        if key in trainer:
            checkpoint[key] = decode_hparams(trainer[key] or {})
            checkpoint[name] = trainer.get(name)
    checkpoint.update(trainer.get("user") or {})
    return checkpoint if device is None else _to_device(checkpoint, device)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return type(value)((k, _to_device(v, device)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value
