"""Callbacks: the Callback base and Kiln's built-in callbacks."""

from __future__ import annotations

import importlib
from typing import Any

from callbacks.accumulation import GradientAccumulation
from callbacks.base import Callback

_LAZY = {
    "ModelCheckpoint": "callbacks.checkpoint",
    "RNGCapture": "callbacks.rng",
    "EarlyStopping": "callbacks.early_stopping",
    "LearningRateMonitor": "callbacks.lr_monitor",
    "ProgressBar": "callbacks.progress",
    "TQDMProgressBar": "callbacks.progress",
    "ModelSummary": "callbacks.model_summary",
    "Timer": "callbacks.timer",
    "ThroughputMonitor": "callbacks.throughput_monitor",
    "LambdaCallback": "callbacks.lambda_function",
    "BasePredictionWriter": "callbacks.prediction_writer",
    "DeviceStatsMonitor": "callbacks.device_stats_monitor",
    "StochasticWeightAveraging": "callbacks.stochastic_weight_avg",
    "GradientAccumulationScheduler": "callbacks.gradient_accumulation_scheduler",
}

__all__ = ["Callback", "GradientAccumulation", *_LAZY]

# Lightning callbacks whose job Kiln does another way: importing one says which.
_KILN_WAY = {
    "RichModelSummary": "Kiln prints the summary as plain text: use callbacks.ModelSummary(max_depth=...)",
    "RichProgressBar": "Kiln's bar is tqdm: use callbacks.TQDMProgressBar(...) (or ProgressBar)",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _KILN_WAY:
        raise ImportError(f"callbacks.{name} (Lightning) is not part of Kiln; {_KILN_WAY[name]}.")
    raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
