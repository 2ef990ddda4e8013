"""The batch size that weights epoch means, read from the batch the way Lightning reads it.

The first tensor found walking the batch (mappings by value, sequences in order, dataclass fields)
gives the size: its first dimension, or 1 for a 0-dim tensor. When tensors disagree, the first one
wins and a warning (once per message) asks for ``self.log(..., batch_size=...)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

_warned: set[str] = set()


def _sizes(batch: Any) -> Iterator[int | None]:
    if isinstance(batch, torch.Tensor):
        yield batch.size(0) if batch.ndim else 1
    elif isinstance(batch, (Iterable, Mapping)) and not isinstance(batch, str):
        for item in batch.values() if isinstance(batch, Mapping) else batch:
            yield from _sizes(item)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for field in dataclasses.fields(batch):
            yield from _sizes(getattr(batch, field.name))
    else:
        yield None


def infer_batch_size(batch: Any) -> int:
    """The batch size of ``batch``; raises ``ValueError`` when no size can be read from it."""
    found: int | None = None
    try:
        for size in _sizes(batch):
            if found is None:
                found = size
            elif size != found:
                message = (f"The batch size used to weight epoch means is ambiguous: the batch holds collections "
                           f"of different lengths; using {found}, the first one found. Pass "
                           "self.log(..., batch_size=N) to say which.")
                if message not in _warned:
                    _warned.add(message)
                    warnings.warn(message, stacklevel=4)
                break
    except RecursionError:
        found = None
    if found is None:
        raise ValueError(f"Could not infer the batch size from a batch of type {type(batch).__name__} to weight the "
                         "epoch mean; pass self.log(..., batch_size=N).")
    return found
