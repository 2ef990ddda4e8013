"""Hyperparameters: ``save_hyperparameters()``, ``self.hparams`` and ``self.hparams_initial``.

A mixin shared by TrainModule and DataModule with Lightning's names and semantics: called without
arguments it records every ``__init__`` argument (of the whole ``super().__init__`` chain, the most
derived class winning), or only the named ones, or one dict / ``argparse.Namespace``; ``ignore=``
drops names; ``logger=False`` keeps them away from the loggers. Checkpoints store them as JSON
(``framework.hparams_codec``), never by pickle.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import warnings
from argparse import Namespace
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ["AttributeDict", "HyperparametersMixin", "hparams_for_logging"]


class AttributeDict(dict):
    """A dict whose items are also attributes: ``hparams.lr`` is ``hparams["lr"]``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{key}'") from exc

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc

    def __repr__(self) -> str:
        if not self:
            return ""
        width = max(len(str(k)) for k in self) + 3
        rows = sorted((str(k), v) for k, v in self.items())  # sorted by name, as Lightning prints them
        return "\n".join(f"{chr(34) + k + chr(34) + ':':{width}} {v}" for k, v in rows)

    def __deepcopy__(self, memo: dict[int, Any]) -> AttributeDict:
        return type(self)(copy.deepcopy(dict(self), memo))


class HyperparametersMixin:
    """``save_hyperparameters`` / ``hparams`` / ``hparams_initial`` (Lightning's ``HyperparametersMixin``).

    State lives in instance attributes created on first use, so the mixin needs no ``__init__`` and
    works before or after ``nn.Module.__init__``.
    """

    _log_hyperparams: bool = False
    _hparams_name: str | None = None

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None,
                             frame: types.FrameType | None = None, logger: bool = True) -> None:
        """Record hyperparameters in ``self.hparams`` (see the module docstring for the forms of ``args``).

        ``frame`` is the ``__init__`` frame to read arguments from (default: the caller's).
        """
        self._log_hyperparams = bool(logger)
        if len(args) == 1 and not isinstance(args[0], str) and not args[0]:
            return  # an empty container: nothing to record (as in Lightning)
        if frame is None:
            current = inspect.currentframe()
            frame = current.f_back if current is not None else None
        init_args = _init_args(self, frame)
        ignored = _ignore_names(ignore)
        init_args = {k: v for k, v in init_args.items() if k not in ignored}

        objects = [a for a in args if not isinstance(a, str)]
        if not args:
            hp: Any = init_args
            self._hparams_name = "kwargs" if hp else None
        elif objects:
            if len(objects) > 1:
                raise ValueError(f"save_hyperparameters() takes one dict or Namespace, got {len(objects)} "
                                 f"({', '.join(type(o).__name__ for o in objects)}); merge them into one dict.")
            hp = objects[0]
            names = [k for k, v in init_args.items() if v is hp or _safe_equal(v, hp)]
            self._hparams_name = names[0] if names else None
        else:
            both = [a for a in args if a in ignored]
            if both:
                raise ValueError(f"save_hyperparameters: {both} named and also in ignore=; drop one of the two.")
            missing = [a for a in args if a not in init_args]
            if missing:
                raise ValueError(f"save_hyperparameters({', '.join(map(repr, args))}): {missing} "
                                 f"{'is' if len(missing) == 1 else 'are'} not an argument of "
                                 f"{type(self).__name__}.__init__ (its arguments: {sorted(init_args)}); pass names "
                                 "of __init__ arguments, or a dict of values.")
            hp = {a: init_args[a] for a in args}
            self._hparams_name = "kwargs"
        self._set_hparams(hp)
        for key, value in self.hparams.items():
            if _is_module(value):
                warnings.warn(f"Hyperparameter {key!r} of {type(self).__name__} is an nn.Module: its weights are "
                              "already saved in the checkpoint, and checkpoints keep hyperparameters as JSON, so it "
                              "will have to be passed again to load_from_checkpoint. Leave it out with "
                              f"self.save_hyperparameters(ignore=[{key!r}]).", UserWarning, stacklevel=2)
        object.__setattr__(self, "_hparams_initial", _copy_values(self.hparams))

    def _set_hparams(self, hp: Any) -> None:
        if isinstance(hp, Namespace):
            hp = vars(hp)
        if isinstance(hp, (bool, int, float, str)):
            raise ValueError(f"save_hyperparameters({hp!r}): a single {type(hp).__name__} is not a set of "
                             "hyperparameters; pass argument names as strings, or a dict/Namespace of values.")
        if not isinstance(hp, MutableMapping):
            raise ValueError(f"save_hyperparameters() got a {type(hp).__name__}; pass argument names as strings, "
                             "or a dict/argparse.Namespace of values.")
        self.hparams.update(hp)

    @property
    def hparams(self) -> AttributeDict:
        """The recorded hyperparameters; mutable (``hparams_initial`` keeps the values as first saved)."""
        hp = self.__dict__.get("_hparams")
        if hp is None:
            hp = AttributeDict()
            object.__setattr__(self, "_hparams", hp)
        return hp

    @property
    def hparams_initial(self) -> AttributeDict:
        """A copy of the hyperparameters as ``save_hyperparameters`` recorded them (changes are not kept)."""
        initial = self.__dict__.get("_hparams_initial")
        return AttributeDict() if initial is None else _copy_values(initial)


def hparams_for_logging(module: Any, datamodule: Any = None) -> dict[str, Any] | None:
    """What the loggers receive (Lightning's merge): the module's and the datamodule's initial
    hyperparameters of those that called ``save_hyperparameters(logger=True)``; None when neither did.

    A key present in both with different values is a RuntimeError, as in Lightning.
    """
    sources = [obj for obj in (module, datamodule) if obj is not None and getattr(obj, "_log_hyperparams", False)]
    if not sources:
        return None
    if len(sources) == 2:
        first, second = (s.hparams_initial for s in sources)
        clash = sorted(k for k in first.keys() & second.keys()
                       if k != "_class_path" and (type(first[k]) is not type(second[k]) or not _safe_equal(first[k], second[k])))
        if clash:
            raise RuntimeError(f"Error while merging hparams: the keys {clash} are present in both the module's and "
                               "the datamodule's hparams but have different values; rename one of them.")
    merged: dict[str, Any] = {}
    for source in sources:
        merged.update(source.hparams_initial)
    merged.pop("_class_path", None)
    return merged


# ---- reading __init__ arguments from the call stack ----------------------------------------------------

def _init_args(obj: Any, frame: types.FrameType | None) -> dict[str, Any]:
    """Arguments of the ``__init__`` calls running for ``obj`` (innermost first, outer ones override)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    collected: list[dict[str, Any]] = []
    inside = False
    while frame is not None:
        args = _frame_init_args(obj, frame)
        if args is None:
            if inside:
                break
        else:
            inside = True
            collected.append(args)
        frame = frame.f_back
    merged: dict[str, Any] = {}
    for args in collected:
        merged.update(args)
    return merged


def _frame_init_args(obj: Any, frame: types.FrameType) -> dict[str, Any] | None:
    """The named arguments of ``frame`` if it is an ``__init__`` running on ``obj``, else None."""
    code = frame.f_code
    if code.co_name != "__init__" or code.co_argcount == 0:
        return None
    local = frame.f_locals
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    if local.get(names[0]) is not obj:
        return None
    args = {name: local[name] for name in names[1:] if name in local}
    flags = code.co_flags
    index = code.co_argcount + code.co_kwonlyargcount
    if flags & inspect.CO_VARARGS:
        index += 1  # *args are positional values without names: not hyperparameters (as in Lightning)
    if flags & inspect.CO_VARKEYWORDS:
        extra = local.get(code.co_varnames[index])
        if isinstance(extra, Mapping):
            args.update(extra)
    return {k: v for k, v in args.items() if k not in ("__class__", "frame")}


def _ignore_names(ignore: Sequence[str] | str | None) -> set[str]:
    if ignore is None:
        return set()
    if isinstance(ignore, str):
        return {ignore}
    if not isinstance(ignore, (list, tuple, set, frozenset)):
        raise TypeError(f"save_hyperparameters(ignore={ignore!r}): pass a name or a list of names.")
    return {name for name in ignore if isinstance(name, str)}


def _safe_equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors, arrays: ambiguous truth values
        return a is b


def _is_module(value: Any) -> bool:
    import torch

    return isinstance(value, torch.nn.Module)


def _copy_values(hp: Mapping[str, Any]) -> AttributeDict:
    """A deep copy where values allow it; others (locks, open files, ...) are shared rather than failing."""
    out = AttributeDict()
    for key, value in hp.items():
        try:
            out[key] = copy.deepcopy(value)
        except Exception:
            out[key] = value
    return out
