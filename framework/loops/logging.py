"""Sending logged metrics to the loggers: every ``log_every_n_steps`` optimizer steps, and at epoch ends.

The only place the training path copies values to the host; steps that no logger writes cost nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from framework.metrics import to_floats

if TYPE_CHECKING:
    from framework.trainer import Trainer


class MetricLogging:
    """Moves what ``self.log`` collected to ``trainer.logged_metrics`` and the loggers."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    def log_step(self, global_step: int) -> None:
        """After optimizer step ``global_step``: write the latest step values when it is a logging step."""
        t = self.t
        every = t.log_every_n_steps
        if every and global_step % every == 0:
            values = t._metrics.step_values
            if values:
                self.log(values)

    def flush_epoch(self) -> None:
        """At an epoch's end: reduce the epoch values, write them, and let loggers flush to storage."""
        self.log(self.t._metrics.reduce_epoch())
        for logger in self.t.loggers:
            logger.save()

    def log_results(self, results: list[dict[str, Any]]) -> None:
        """An evaluation's per-dataloader results, written once as one dict."""
        merged: dict[str, torch.Tensor] = {}
        for metrics in results:
            merged.update(metrics)
        self.log(merged)

    def log(self, metrics: dict[str, torch.Tensor], step: int | None = None) -> None:
        """Write ``metrics`` at ``step`` (default: ``global_step``)."""
        t = self.t
        if not metrics:
            return
        t.logged_metrics.update(metrics)
        if t.loggers:
            floats = to_floats(metrics)  # read on the CPU; one transfer from an accelerator
            floats.setdefault("epoch", float(t.current_epoch))
            for logger in t.loggers:
                logger.log_metrics(floats, step=t.global_step if step is None else step)
