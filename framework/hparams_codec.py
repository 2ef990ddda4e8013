"""Hyperparameters <-> JSON, for checkpoints (never pickle).

Decision (documented in the README's porting guide): a value JSON cannot hold is **stored by its repr
with a warning**, not refused. Refusing would fail a training run at its first checkpoint (hours in)
over a value that is usually an object the user passes again anyway (a backbone, a loss function); the
weights are saved regardless. Such a value is never fed back by ``load_from_checkpoint``: loading
raises a ``ValueError`` naming the argument unless it is passed again as a keyword override, so a repr
can never silently become a constructor argument.

Held exactly: None, bool, int, float (also inf/nan), str, list, tuple, dict (any JSON-able keys),
``argparse.Namespace`` (comes back as a dict, as in Lightning), ``pathlib`` paths, ``torch.dtype``,
``torch.device``, numpy scalars (as Python numbers).
"""

from __future__ import annotations

import math
import pathlib
import sys
import warnings
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

__all__ = ["TAG", "encode_hparams", "decode_hparams", "unrestorable", "hparams_for_checkpoint"]

TAG = "__hparam__"  # marks a tagged JSON object; plain JSON values are stored as they are
_REPR_LIMIT = 2000


def encode_hparams(hparams: Mapping[str, Any], owner: str = "module") -> dict[str, Any]:
    """A pure-JSON copy of ``hparams``; values JSON cannot hold become repr records (one warning each)."""
    return {str(key): _encode(value, str(key), owner) for key, value in hparams.items()}


def _encode(value: Any, name: str, owner: str) -> Any:
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if isinstance(value, float):
        value = float(value)
        return value if math.isfinite(value) else {TAG: "float", "value": repr(value)}
    if isinstance(value, int):  # IntEnum and other int subclasses keep their number
        return int(value) if kind.__module__ == "builtins" else _repr_record(value, name, owner)
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        if all(type(k) is str for k in value) and TAG not in value:
            return {k: _encode(v, f"{name}.{k}", owner) for k, v in value.items()}
        return {TAG: "dict", "items": [[_encode(k, f"{name} key", owner), _encode(v, f"{name}[{k!r}]", owner)]
                                        for k, v in value.items()]}
    if kind is list:
        return [_encode(v, f"{name}[{i}]", owner) for i, v in enumerate(value)]
    if kind is tuple:
        return {TAG: "tuple", "items": [_encode(v, f"{name}[{i}]", owner) for i, v in enumerate(value)]}
    if isinstance(value, pathlib.PurePath):
        return {TAG: "path", "value": str(value)}
    torch = sys.modules.get("torch")
    if torch is not None and kind is torch.dtype:
        return {TAG: "dtype", "name": str(value).removeprefix("torch.")}
    if torch is not None and kind is torch.device:
        return {TAG: "device", "name": str(value)}
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return _encode(value.item(), name, owner)
    return _repr_record(value, name, owner)


def _repr_record(value: Any, name: str, owner: str) -> dict[str, Any]:
    kind = type(value)
    type_name = f"{kind.__module__}.{kind.__qualname__}"
    top = name.split(".")[0].split("[")[0].split(" ")[0]
    warnings.warn(f"Hyperparameter {name!r} of {owner} is a {type_name}, which a JSON checkpoint cannot hold: it is "
                  f"stored by its repr only, and load_from_checkpoint will ask for it again "
                  f"(load_from_checkpoint(path, {top}=...)). Leave it out with "
                  f"save_hyperparameters(ignore=[{top!r}]) to silence this.", UserWarning, stacklevel=4)
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not fail the checkpoint
        text = f"<unrepresentable: {type(exc).__name__}>"
    return {TAG: "repr", "type": type_name, "repr": text[:_REPR_LIMIT]}


def decode_hparams(stored: Mapping[str, Any]) -> dict[str, Any]:
    """Values back from :func:`encode_hparams`; repr records stay records (see :func:`unrestorable`)."""
    if not isinstance(stored, Mapping):
        raise ValueError(f"stored hyperparameters are a {type(stored).__name__}, not a JSON object")
    return {key: _decode(value) for key, value in stored.items()}


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, Mapping):
        return value
    tag = value.get(TAG)
    if tag is None:
        from framework.hparams import AttributeDict

        return AttributeDict({k: _decode(v) for k, v in value.items()})
    if tag == "tuple":
        return tuple(_decode(v) for v in value["items"])
    if tag == "dict":
        return {_hashable(_decode(k)): _decode(v) for k, v in value["items"]}
    if tag == "float":
        return float(value["value"])
    if tag == "path":
        return pathlib.Path(value["value"])
    if tag == "dtype":
        import torch

        dtype = getattr(torch, str(value["name"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"stored hyperparameter names an unknown torch dtype {value['name']!r}")
        return dtype
    if tag == "device":
        import torch

        return torch.device(value["name"])
    if tag == "repr":
        return dict(value)
    raise ValueError(f"stored hyperparameter has an unknown tag {tag!r}; it was written by a newer Kiln")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def unrestorable(value: Any) -> bool:
    """True for a decoded value that was stored by its repr only."""
    return isinstance(value, dict) and value.get(TAG) == "repr"


def hparams_for_checkpoint(module: Any, datamodule: Any = None) -> dict[str, Any]:
    """The hyperparameter entries of a checkpoint, with Lightning's keys: ``hyper_parameters`` and
    ``hparams_name`` for the module, ``datamodule_hyper_parameters`` / ``datamodule_hparams_name`` for
    the datamodule; only for objects that have hyperparameters. Pure JSON."""
    entries: dict[str, Any] = {}
    for obj in (module, datamodule):
        hparams = getattr(obj, "hparams", None) if obj is not None else None
        if not hparams:
            continue
        entries[obj.CHECKPOINT_HYPER_PARAMS_NAME] = getattr(obj, "_hparams_name", None)
        entries[obj.CHECKPOINT_HYPER_PARAMS_KEY] = encode_hparams(hparams, type(obj).__name__)
    return entries
