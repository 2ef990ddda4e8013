"""Profilers, selected by ``Trainer(profiler=...)``: None (off), "simple", "advanced", "pytorch", or a
``Profiler`` instance. The Trainer times its actions with ``trainer.profiler.profile(name)``.
"""

from __future__ import annotations

import importlib
from typing import Any

from framework.profiler.base import PassThroughProfiler, Profiler

_LAZY = {
    "SimpleProfiler": "framework.profiler.simple",
    "AdvancedProfiler": "framework.profiler.advanced",
    "PyTorchProfiler": "framework.profiler.pytorch",
}
_BY_NAME = {"simple": "SimpleProfiler", "advanced": "AdvancedProfiler", "pytorch": "PyTorchProfiler"}

__all__ = ["PassThroughProfiler", "Profiler", "resolve_profiler", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'framework.profiler' has no attribute {name!r}")


def resolve_profiler(profiler: Profiler | str | None, dirpath: str | None = None) -> Profiler:
    """The Trainer's ``profiler`` argument as a Profiler (a PassThroughProfiler when None).

    ``dirpath`` (the Trainer's root dir) is where a profiler named by string writes when ``setup`` gets no
    log dir; a Profiler instance keeps its own settings.
    """
    if profiler is None:
        return PassThroughProfiler()
    if isinstance(profiler, Profiler):
        return profiler
    if isinstance(profiler, str):
        key = profiler.lower()
        if key == "xla":
            raise ValueError("Trainer(profiler='xla') is not available in Kiln; use profiler='pytorch' "
                             "(torch.profiler) or torch_xla.debug.profiler directly.")
        if key in _BY_NAME:
            made = __getattr__(_BY_NAME[key])()
            made._fallback_dirpath = dirpath
            return made
        raise ValueError(f"Trainer(profiler={profiler!r}) is not a known profiler; use 'simple', 'advanced', "
                         "'pytorch', None, or a framework.profiler.Profiler instance.")
    raise TypeError(f"`profiler` must be None, a str or a framework.profiler.Profiler, got {profiler!r}.")
