"""Strategies: where the model lives and how processes cooperate (single device, DDP, FSDP, DeepSpeed, XLA).

Classes are imported on first use so that ``import strategies`` does not import torch.distributed's
heavier parts, deepspeed or torch_xla.
"""

from __future__ import annotations

import importlib
from typing import Any

from strategies.base import Strategy
from strategies.registry import available_strategies, register_strategy, resolve_strategy
from strategies.single import SingleDeviceStrategy

_LAZY = {
    "DDPStrategy": "strategies.ddp",
    "FSDPStrategy": "strategies.fsdp",
    "ModelParallelStrategy": "strategies.model_parallel",
    "DeepSpeedStrategy": "strategies.deepspeed",
    "XLAStrategy": "strategies.xla",
}

__all__ = ["Strategy", "SingleDeviceStrategy", *_LAZY, "available_strategies", "register_strategy",
           "resolve_strategy"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
