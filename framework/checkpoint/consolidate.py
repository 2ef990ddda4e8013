"""Consolidation: the model weights of any Kiln checkpoint as a plain state dict, module or file.

:func:`read_model_state` is the single place that knows how model weights are laid out, keyed by
the manifest's ``layout``: ``"full"`` (``model.*`` written by rank 0) and ``"dcp"`` (sharded,
written by torch.distributed.checkpoint). A strategy adding a layout extends that dispatch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

import framework.checkpoint.tensor_files as tensor_files
from framework.checkpoint.format import MODEL, Manifest, checkpoint_error
from framework.checkpoint.load import read_manifest, read_state, verify_checkpoint
from framework.checkpoint.storage import locate

__all__ = ["read_model_state", "load_weights", "export_safetensors", "DCP_DIR", "DCP_MODEL_KEY"]


def read_model_state(path: str, manifest: Manifest | None = None, *, verify: bool = True,
                     mapped: bool = False) -> dict[str, Any]:
    """The full module state dict of any Kiln checkpoint, on CPU (``mapped=True``: see ``read_state``).

    This is the one place that knows checkpoint layouts: ``"full"`` stores ``model.*``; sharded
    layouts are read by ``_read_dcp_model_state`` (extend the dispatch here for new layouts).
    """
    manifest = manifest if manifest is not None else read_manifest(path)
    if manifest.layout == "full":
        state = read_state(path, MODEL, manifest, verify=verify, mapped=mapped)
    elif manifest.layout == "dcp":
        state = _read_dcp_model_state(path, manifest, verify=verify)
    else:
        raise checkpoint_error(path, f"its layout {manifest.layout!r} is unknown to this Kiln; upgrade Kiln")
    if not isinstance(state, Mapping):
        raise checkpoint_error(path, f"its model state is a {type(state).__qualname__}, not a state dict")
    return dict(state)


DCP_DIR = "dcp"
DCP_MODEL_KEY = "model"


def _read_dcp_model_state(path: str, manifest: Manifest, *, verify: bool) -> dict[str, Any]:
    """Layout ``"dcp"``: files under ``dcp/`` written by torch.distributed.checkpoint.save of a dict
    whose ``"model"`` entry is the module state dict. Loaded without a process group."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    if verify:
        verify_checkpoint(path, manifest)
    loc = locate(path).join(DCP_DIR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable")  # one process: intended
        if loc.is_local:
            loaded = _load_state_dict_from_keys({DCP_MODEL_KEY}, checkpoint_id=loc.url)
        else:
            from torch.distributed.checkpoint import FsspecReader

            loaded = _load_state_dict_from_keys({DCP_MODEL_KEY}, storage_reader=FsspecReader(loc.url))
    return loaded[DCP_MODEL_KEY]


def load_weights(path: str, module: torch.nn.Module, *, strict: bool = True, verify: bool = True) -> Any:
    """Load a checkpoint's model weights into a plain ``nn.Module`` (returns load_state_dict's result)."""
    return module.load_state_dict(read_model_state(path, verify=verify), strict=strict)


def export_safetensors(path: str, out_file: str, *, verify: bool = True) -> str:
    """Write the checkpoint's model weights as one self-contained ``model.safetensors``.

    Tied weights are written under each of their keys, so the file loads with
    ``safetensors.torch.load_file`` + ``load_state_dict(strict=True)``.
    """
    state = read_model_state(path, verify=verify)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(str(k) for k in state.keys() - tensors.keys())
    if skipped:
        warnings.warn(f"export_safetensors: skipping non-tensor model entries {skipped}", stacklevel=2)
    out = locate(out_file)
    tensor_files.write_safetensors(out, tensors)
    return out_file
