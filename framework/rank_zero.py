"""Rank-zero helpers with Lightning's names: ``rank_zero_only`` and ``rank_zero_info/warn/debug``.

``rank_zero_only.rank`` is this process's global rank: read from the launcher's environment at import
(``RANK``, ``SLURM_PROCID``, ``JSM_NAMESPACE_RANK``, else ``LOCAL_RANK``, else 0) and kept current by
the Trainer when its strategy sets up (``sync_rank``). Assign it yourself in a custom launcher.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, overload

__all__ = ["rank_zero_only", "rank_zero_info", "rank_zero_warn", "rank_zero_debug", "sync_rank"]

log = logging.getLogger("framework")
T = TypeVar("T")


def _rank_from_environment() -> int:
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK"):
        value = os.environ.get(key)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


@overload
def rank_zero_only(fn: Callable[..., T]) -> Callable[..., T | None]: ...
@overload
def rank_zero_only(fn: Callable[..., T], default: T) -> Callable[..., T]: ...
def rank_zero_only(fn: Callable[..., Any], default: Any = None) -> Callable[..., Any]:
    """Decorate ``fn`` so it runs only on global rank 0; other ranks get ``default`` (None)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        rank = getattr(rank_zero_only, "rank", None)
        if rank is None:
            raise RuntimeError("rank_zero_only.rank is not set; assign this process's global rank to it.")
        return fn(*args, **kwargs) if rank == 0 else default

    return wrapped


rank_zero_only.rank = _rank_from_environment()  # type: ignore[attr-defined]


def sync_rank(global_rank: int) -> None:
    """Set ``rank_zero_only.rank`` (the Trainer calls this once its strategy knows the rank)."""
    rank_zero_only.rank = int(global_rank)  # type: ignore[attr-defined]


@rank_zero_only
def rank_zero_info(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """``logging.info`` on rank 0 only (logger ``"framework"``)."""
    log.info(*args, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_debug(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """``logging.debug`` on rank 0 only (logger ``"framework"``)."""
    log.debug(*args, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_warn(message: str | Warning, stacklevel: int = 4, **kwargs: Any) -> None:
    """``warnings.warn`` on rank 0 only; ``category=`` as in ``warnings.warn``."""
    warnings.warn(message, stacklevel=stacklevel, **kwargs)
