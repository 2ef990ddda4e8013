"""Logged values as Python floats, for loggers and evaluation results: the one place metrics leave the device."""

from __future__ import annotations

import torch


def to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Python floats of a dict of single-element tensors: read directly on the CPU, in one host transfer for
    the tensors of one accelerator."""
    if not metrics:
        return {}
    keys = list(metrics)
    tensors = [metrics[k].detach() for k in keys]
    device = tensors[0].device
    if device.type == "cpu" or any(t.device != device for t in tensors):
        return {k: float(t) for k, t in zip(keys, tensors)}
    return dict(zip(keys, torch.stack([t.float().reshape(()) for t in tensors]).cpu().tolist()))
