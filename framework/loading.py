"""``load_from_checkpoint`` for TrainModule and DataModule: rebuild from the saved hyperparameters.

Lightning's signature and semantics: the saved hyperparameters become the ``__init__`` arguments,
keyword overrides win, ``hparams_file`` (.yaml/.yml/.csv) replaces the saved ones; a module then gets
``configure_model()`` (if overridden), ``on_load_checkpoint(checkpoint)`` and its weights
(``strict``), a datamodule its ``load_state_dict``. Kiln differences: a checkpoint is a directory or
URL (a ``memory://``/``s3://`` one too); ``<dirpath>/last`` and ``<dirpath>/best`` resolve inside
``dirpath`` when no checkpoint has that name; weights load on the CPU unless ``map_location`` names a
device; values stored by repr (see ``framework.hparams_codec``) must be passed again.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from framework.hparams import AttributeDict
from framework.hparams_codec import decode_hparams, unrestorable

__all__ = ["restricted_classmethod", "load_from_checkpoint", "resolve_checkpoint_path", "read_hparams_file"]


class restricted_classmethod:  # noqa: N801 - used as a decorator, like classmethod
    """A classmethod that refuses to be called through an instance (``model.load_from_checkpoint(...)``
    would build a new object and leave ``model`` unchanged, a common silent mistake)."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method
        functools.update_wrapper(self, method)

    def __get__(self, instance: Any, owner: type) -> Callable[..., Any]:
        method = self.method

        @functools.wraps(method)
        def bound(*args: Any, **kwargs: Any) -> Any:
            if instance is not None:
                raise TypeError(f"{owner.__name__}.{method.__name__} is a classmethod that returns a new object; "
                                f"it cannot be called on an instance. Use "
                                f"obj = {owner.__name__}.{method.__name__}(...) instead.")
            return method(owner, *args, **kwargs)

        return bound


def load_from_checkpoint(cls: type, checkpoint_path: str | os.PathLike, map_location: Any = None,
                         hparams_file: str | os.PathLike | None = None, strict: bool | None = None,
                         **overrides: Any) -> Any:
    """Build ``cls`` from a checkpoint's hyperparameters and load its state (see the module docstring)."""
    from framework import checkpoint as io
    from framework.datamodule import DataModule

    device = _map_location(map_location)
    path = resolve_checkpoint_path(checkpoint_path)
    manifest = io.read_manifest(path)
    checkpoint: dict[str, Any] = dict(io.read_state(path, io.TRAINER, manifest))
    checkpoint.setdefault("epoch", manifest.metadata.get("epoch"))
    checkpoint.setdefault("global_step", manifest.metadata.get("global_step"))
    key = cls.CHECKPOINT_HYPER_PARAMS_KEY
    hparams = decode_hparams(checkpoint.get(key) or {})
    if hparams_file is not None:
        hparams = read_hparams_file(hparams_file)
    hparams.update(overrides)
    checkpoint[key] = hparams
    obj = cls(**_init_kwargs(cls, hparams, checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_NAME), overrides))

    if isinstance(obj, DataModule):
        state = checkpoint.get(type(obj).__qualname__)
        if state is not None:
            obj.load_state_dict(state)
        return obj
    return _load_module(obj, path, manifest, checkpoint, strict, device)


def _load_module(obj: Any, path: str, manifest: Any, checkpoint: dict[str, Any], strict: bool | None,
                 device: torch.device | None) -> Any:
    from framework.checkpoint.consolidate import read_model_state

    if obj._strict_loading is not None and strict is not None and strict != obj.strict_loading:
        raise ValueError(f"load_from_checkpoint(..., strict={strict!r}) contradicts {type(obj).__name__}."
                         f"strict_loading={obj.strict_loading!r}; set the same value for both.")
    strict = obj.strict_loading if strict is None else strict
    if _overrides(obj, "configure_model"):
        obj.configure_model()
        object.__setattr__(obj, "_kiln_model_configured", True)  # the Trainer must not build the layers twice
    checkpoint["state_dict"] = read_model_state(path, manifest)
    obj.on_load_checkpoint(checkpoint)
    keys = obj.load_state_dict(checkpoint["state_dict"], strict=strict)
    if not strict:
        if keys.missing_keys:
            warnings.warn(f"Found keys that are in the model state dict but not in the checkpoint: "
                          f"{keys.missing_keys}", UserWarning, stacklevel=3)
        if keys.unexpected_keys:
            warnings.warn(f"Found keys that are not in the model state dict but in the checkpoint: "
                          f"{keys.unexpected_keys}", UserWarning, stacklevel=3)
    return obj.to(device) if device is not None else obj


def _init_kwargs(cls: type, hparams: dict[str, Any], hparams_name: str | None,
                 overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The ``__init__`` keyword arguments: saved values (or the one dict argument they came from),
    overrides on top; names ``__init__`` cannot take are dropped unless it has ``**kwargs``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    if hparams_name and hparams_name in named:
        kwargs: dict[str, Any] = {hparams_name: AttributeDict(hparams)}
        kwargs.update(overrides)
    else:
        kwargs = dict(hparams)
    if not takes_any:
        kwargs = {k: v for k, v in kwargs.items() if k in named}
    passed = hparams if hparams_name in kwargs else kwargs  # the values that reach __init__
    lost = {k: v for k, v in passed.items() if k not in overrides and _holds_repr(v)}
    if lost:
        what = "; ".join(f"{k!r} was a {_first_repr(v)['type']}" for k, v in lost.items())
        raise ValueError(f"{cls.__name__}.load_from_checkpoint: hyperparameter(s) {sorted(lost)} were stored by repr only "
                         f"({what}), so they cannot be rebuilt from the checkpoint; pass them again: "
                         f"{cls.__name__}.load_from_checkpoint(path, {', '.join(f'{k}=...' for k in sorted(lost))}).")
    return kwargs


def _holds_repr(value: Any) -> bool:
    if unrestorable(value):
        return True
    if isinstance(value, Mapping):
        return any(_holds_repr(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_repr(v) for v in value)
    return False


def _first_repr(value: Any) -> dict[str, Any]:
    if unrestorable(value):
        return value
    items = value.values() if isinstance(value, Mapping) else value
    return next(_first_repr(v) for v in items if _holds_repr(v))


def _map_location(map_location: Any) -> torch.device | None:
    if map_location is None:
        return None
    if isinstance(map_location, (str, int, torch.device)):
        try:
            return torch.device(map_location)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"map_location={map_location!r} is not a device; pass e.g. 'cpu' or 'cuda:0'.") from exc
    raise TypeError(f"map_location={map_location!r} ({type(map_location).__name__}): Kiln checkpoints are read "
                    "onto the CPU and keep no per-tensor device, so a dict or callable remapping (torch.load's) "
                    "has nothing to map; pass the target device, e.g. map_location='cuda:0'.")


def resolve_checkpoint_path(checkpoint_path: str | os.PathLike) -> str:
    """The checkpoint directory/URL to read: the path itself, or for ``<dirpath>/last`` /
    ``<dirpath>/best`` (when no checkpoint has that name) the newest complete checkpoint in ``dirpath``
    / the best one its ModelCheckpoint recorded. Never a path outside ``dirpath``."""
    from framework import checkpoint as io
    from framework.checkpoint import locate

    if not isinstance(checkpoint_path, (str, os.PathLike)):
        raise TypeError(f"checkpoint_path={checkpoint_path!r}: pass a checkpoint directory path or URL "
                        "(Kiln checkpoints are directories, not file objects).")
    path = os.fspath(checkpoint_path)
    stripped = path.rstrip("/") or path
    if "://" in stripped:
        dirpath, _, name = stripped.rpartition("/")
    else:
        dirpath, name = os.path.split(stripped)
    if name in ("last", "best") and not locate(path).join(io.MANIFEST).exists():
        dirpath = dirpath or "."
        newest = io.find_last(dirpath)
        if newest is None:
            raise io.CheckpointError(f"{io.redact(path)}: no complete checkpoint under {io.redact(dirpath)} to "
                                     f"resolve {name!r} from; check the path (checkpoints are directories with a "
                                     "manifest.json).")
        return newest if name == "last" else _best(dirpath, newest)
    if not locate(path).join(io.MANIFEST).exists() and not os.path.isfile(path) and io.list_checkpoints(path):
        raise io.CheckpointError(f"{io.redact(path)} is a directory of checkpoints, not one checkpoint; pass one of "
                                 f"them, or {io.redact(stripped)}/last for the newest.")
    return path


def _best(dirpath: str, newest: str) -> str:
    """The best checkpoint recorded by the ModelCheckpoint state in the newest checkpoint of ``dirpath``."""
    from framework import checkpoint as io
    from framework.checkpoint.storage import join_path

    states = io.read_state(newest, io.TRAINER).get("callbacks") or {}
    best = {s["best_model_path"] for s in states.values() if isinstance(s, Mapping) and s.get("best_model_path")}
    if len(best) != 1:
        reason = "no ModelCheckpoint with a monitored metric recorded one" if not best else \
            f"several ModelCheckpoints recorded one ({sorted(map(io.redact, best))})"
        raise io.CheckpointError(f"cannot resolve 'best' in {io.redact(dirpath)}: {reason}; pass the checkpoint "
                                 "path itself.")
    name = str(best.pop()).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    resolved = join_path(dirpath, name)
    io.read_manifest(resolved)  # complete, or a CheckpointError naming it
    return resolved


def read_hparams_file(hparams_file: str | os.PathLike) -> dict[str, Any]:
    """Hyperparameters from a ``.yaml``/``.yml`` file (safe loader) or a Lightning tags ``.csv``."""
    from framework.checkpoint import locate

    name = os.fspath(hparams_file)
    ext = name.rsplit(".", 1)[-1].lower()
    if ext not in ("yaml", "yml", "csv"):
        raise ValueError(f"hparams_file={name!r}: use a .yaml, .yml or .csv file.")
    text = locate(name).read_bytes().decode("utf-8")
    if ext == "csv":
        return _tags_csv(text)
    loaded = _safe_yaml(text) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"hparams_file={name!r} holds a {type(loaded).__name__}, not a mapping of names to values.")
    return loaded


def _safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``!!python/tuple`` (Lightning writes tuples that way); every other
    python tag is still refused."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("tag:yaml.org,2002:python/tuple",
                           lambda loader, node: tuple(loader.construct_sequence(node, deep=True)))
    return yaml.load(text, Loader=Loader)  # a SafeLoader: no Python objects but tuples


def _tags_csv(text: str) -> dict[str, Any]:
    import ast
    import csv

    rows = list(csv.reader(text.splitlines()))
    out: dict[str, Any] = {}
    for row in rows[1:] if rows and rows[0] == ["key", "value"] else rows:
        if len(row) != 2:
            continue
        try:
            out[row[0]] = ast.literal_eval(row[1])
        except (ValueError, SyntaxError):
            out[row[0]] = row[1]
    return out


def _overrides(obj: Any, name: str) -> bool:
    from framework.module import TrainModule

    return getattr(type(obj), name, None) is not getattr(TrainModule, name, None)
