"""Kiln's core: TrainModule, DataModule, Trainer, seeding, the process topology and rank-zero helpers.

Names are imported on first use (PEP 562), so ``import framework`` stays cheap and any submodule can be
imported first, alone, without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TrainModule": "framework.module",
    "DataModule": "framework.datamodule",
    "Trainer": "framework.trainer",
    "seed_everything": "framework.seed",
    "DistributedState": "framework.state",
    "Callback": "framework.hooks",
    "AttributeDict": "framework.hparams",
    "read_checkpoint": "framework.checkpoint_dict",
    "rank_zero_only": "framework.rank_zero",
    "rank_zero_info": "framework.rank_zero",
    "rank_zero_warn": "framework.rank_zero",
    "rank_zero_debug": "framework.rank_zero",
}

_PACKAGES = ("callbacks", "strategies")

__all__ = ["TrainModule", "DataModule", "Trainer", "Callback", "seed_everything", "DistributedState", "AttributeDict",
           "read_checkpoint", "rank_zero_only", "rank_zero_info", "rank_zero_warn", "rank_zero_debug", "cli_lightning_logo"]

if TYPE_CHECKING:
    from framework.checkpoint_dict import read_checkpoint
    from framework.datamodule import DataModule
    from framework.hooks import Callback
    from framework.hparams import AttributeDict
    from framework.module import TrainModule
    from framework.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_only, rank_zero_warn
    from framework.seed import seed_everything
    from framework.state import DistributedState
    from framework.trainer import Trainer


def cli_lightning_logo() -> None:
    """Print Kiln's banner (Lightning's scripts call this at start; the renamed call keeps working)."""
    print("\n  Kiln  -  a PyTorch training framework\n")


def __getattr__(name: str) -> Any:
    if name in _PACKAGES:  # ``from framework import callbacks``: the renamed ``from lightning.pytorch import callbacks``
        value = importlib.import_module(name)
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'framework' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_PACKAGES})
