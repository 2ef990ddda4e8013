"""Throughput over a sliding window: batches/s, samples/s, items/s, FLOP/s and MFU (model FLOPs utilisation).

``Throughput`` takes cumulative counters (``update(time=..., batches=..., samples=...)``) and reports rates
over its last ``window_size`` updates; ``measure_flops`` counts a forward (and backward) with
``torch.utils.flop_counter``; ``get_available_flops`` is a device's peak FLOP/s for the MFU denominator.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

# Dense peak FLOP/s per device name fragment and dtype (vendor datasheets; tensor cores, no sparsity).
_CUDA_PEAK = {
    "h200": {torch.float64: 67e12, torch.float32: 67e12, "tf32": 494.7e12, torch.bfloat16: 989.4e12,
             torch.float16: 989.4e12, torch.int8: 1978.9e12},
    "h100": {torch.float64: 67e12, torch.float32: 67e12, "tf32": 494.7e12, torch.bfloat16: 989.4e12,
             torch.float16: 989.4e12, torch.int8: 1978.9e12},
    "a100": {torch.float64: 9.7e12, torch.float32: 19.5e12, "tf32": 156e12, torch.bfloat16: 312e12,
             torch.float16: 312e12, torch.int8: 624e12},
    "a10g": {torch.float32: 31.2e12, "tf32": 62.5e12, torch.bfloat16: 125e12, torch.float16: 125e12},
    "l4": {torch.float32: 30.3e12, "tf32": 60e12, torch.bfloat16: 121e12, torch.float16: 121e12},
    "v100": {torch.float64: 7.8e12, torch.float32: 15.7e12, torch.float16: 125e12},
    "t4": {torch.float32: 8.1e12, torch.float16: 65e12, torch.int8: 130e12},
}


def measure_flops(model: torch.nn.Module, forward_fn: Callable[[], Any],
                  loss_fn: Callable[[Any], torch.Tensor] | None = None) -> int:
    """FLOPs of ``forward_fn()`` (plus ``loss_fn(output).backward()`` when given), counted by torch.

    Works on a meta-device copy of the model too, so measuring need not allocate real weights.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        if loss_fn is None:
            forward_fn()
        else:
            loss_fn(forward_fn()).backward()
    return int(counter.get_total_flops())


def get_available_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of ``device`` for ``dtype`` (float32 counts as TF32 when matmuls allow it); None if unknown."""
    if device.type != "cuda":
        return None
    return _peak_for_name(torch.cuda.get_device_name(device), dtype)


def _peak_for_name(device_name: str, dtype: torch.dtype) -> float | None:
    tokens = set(re.split(r"[\s\-_]+", device_name.lower()))  # "NVIDIA A100-SXM4-80GB" -> {..., "a100", ...}
    for key, table in _CUDA_PEAK.items():
        if key in tokens:
            if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest" and "tf32" in table:
                return table["tf32"]
            return table.get(dtype)
    return None


class Throughput:
    """Rates over the last ``window_size`` updates; ``world_size`` > 1 adds whole-job totals."""

    def __init__(self, available_flops: float | None = None, world_size: int = 1, window_size: int = 100,
                 separator: str = "/") -> None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 2:
            raise ValueError(f"`window_size` must be an int >= 2 (rates need two points), got {window_size!r}.")
        if world_size < 1:
            raise ValueError(f"`world_size` must be >= 1, got {world_size!r}.")
        self.available_flops = available_flops
        self.world_size = world_size
        self.separator = separator
        self._time: deque[float] = deque(maxlen=window_size)
        self._batches: deque[int] = deque(maxlen=window_size)
        self._samples: deque[int] = deque(maxlen=window_size)
        self._lengths: deque[int] = deque(maxlen=window_size)
        self._flops: deque[float] = deque(maxlen=window_size)

    def update(self, *, time: float, batches: int, samples: int, lengths: int | None = None,
               flops: float | None = None) -> None:
        """Cumulative ``time``/``batches``/``samples``/``lengths`` so far; ``flops`` of this update's batch."""
        if self._time and time < self._time[-1]:
            raise ValueError(f"Throughput time must not decrease: got {time} after {self._time[-1]}.")
        if samples < batches:
            raise ValueError(f"Expected samples ({samples}) >= batches ({batches}).")
        self._time.append(time)
        self._batches.append(batches)
        self._samples.append(samples)
        if lengths is not None:
            self._lengths.append(lengths)
        if flops is not None:
            self._flops.append(flops * self.world_size)

    def compute(self) -> dict[str, float]:
        """Counters, and rates once the window is full (per device under ``device/``, job-wide without)."""
        sep = self.separator
        metrics: dict[str, float] = {"time": self._time[-1], "batches": self._batches[-1],
                                     "samples": self._samples[-1]}
        if self._lengths:
            metrics["lengths"] = self._lengths[-1]
        if len(self._time) < (self._time.maxlen or 0):
            return metrics
        elapsed = self._time[-1] - self._time[0]
        if elapsed <= 0:
            return metrics
        world = self.world_size
        batches_per_sec = (self._batches[-1] - self._batches[0]) / elapsed
        samples_per_sec = (self._samples[-1] - self._samples[0]) / elapsed
        metrics[f"device{sep}batches_per_sec"] = batches_per_sec
        metrics[f"device{sep}samples_per_sec"] = samples_per_sec
        if world > 1:
            metrics["batches_per_sec"] = batches_per_sec * world
            metrics["samples_per_sec"] = samples_per_sec * world
        if len(self._lengths) == self._lengths.maxlen:
            items_per_sec = (self._lengths[-1] - self._lengths[0]) / elapsed
            metrics[f"device{sep}items_per_sec"] = items_per_sec
            if world > 1:
                metrics["items_per_sec"] = items_per_sec * world
        if len(self._flops) == self._flops.maxlen:
            flops_per_sec = (sum(self._flops) - self._flops[0]) / elapsed  # the first batch ends at time[0]
            if world > 1:
                metrics["flops_per_sec"] = flops_per_sec
            metrics[f"device{sep}flops_per_sec"] = flops_per_sec / world
            if self.available_flops:
                metrics[f"device{sep}mfu"] = flops_per_sec / world / self.available_flops
        return metrics

    def reset(self) -> None:
        for window in (self._time, self._batches, self._samples, self._lengths, self._flops):
            window.clear()
