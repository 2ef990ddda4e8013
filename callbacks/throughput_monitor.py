"""ThroughputMonitor: batches/s, samples/s, items/s, FLOP/s and MFU per stage, logged on rank 0.

Nothing runs unless the callback is installed. When it is, each batch costs one clock read (plus a CUDA
synchronize on GPUs, so the clock measures finished work) and the batch-size function.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from framework.hooks import Callback
from framework.throughput import Throughput, get_available_flops

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

_MEASURE = "measure"


def _default_batch_size(batch: Any) -> int:
    """Length of the batch's first tensor (dim 0)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            try:
                return _default_batch_size(item)
            except TypeError:
                continue
    raise TypeError(f"ThroughputMonitor cannot tell the batch size of a {type(batch).__name__}; pass "
                    "batch_size_fn=lambda batch: ... .")


class ThroughputMonitor(Callback):
    """Logs ``<stage>/device/samples_per_sec`` and friends (stage: train, validate, test, predict).

    ``batch_size_fn(batch)`` → samples in a batch (default: the first tensor's length); ``length_fn(batch)``
    → items (e.g. tokens), defaulting to the module's ``num_items(batch)`` when it defines one. FLOPs per
    batch come from ``flops_per_batch`` (a number, or ``"measure"``: count the first training batch's
    forward+backward with ``torch.utils.flop_counter``) or the module's ``flops_per_batch`` attribute;
    MFU needs the device's peak (``available_flops``, known for common CUDA GPUs). ``window_size`` batches
    make one rate; ``separator`` joins name parts. Training rates exclude time spent validating.
    """

    def __init__(self, batch_size_fn: Callable[[Any], int] | None = None,
                 length_fn: Callable[[Any], int] | None = None, *, flops_per_batch: float | str | None = None,
                 available_flops: float | None = None, window_size: int = 100, separator: str = "/") -> None:
        for name, fn in (("batch_size_fn", batch_size_fn), ("length_fn", length_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be a function of the batch, got {fn!r}.")
        if flops_per_batch is not None and flops_per_batch != _MEASURE and (
                isinstance(flops_per_batch, bool) or not isinstance(flops_per_batch, (int, float))
                or flops_per_batch <= 0):
            raise ValueError(f"`flops_per_batch` must be a positive number or 'measure', got {flops_per_batch!r}.")
        Throughput(window_size=window_size)  # validates window_size now, not at the first batch
        self.batch_size_fn = batch_size_fn or _default_batch_size
        self.length_fn = length_fn
        self.flops_per_batch = flops_per_batch
        self.available_flops = available_flops
        self.window_size = window_size
        self.separator = separator
        self._throughputs: dict[str, Throughput] = {}
        self._t0: dict[str, float] = {}
        self._counts: dict[str, list[int]] = {}  # stage -> [batches, samples, lengths]
        self._measured: float | None = None
        self._counter: Any = None
        self._val_started: float | None = None
        self._warned_flops = False

    # ---- bookkeeping -------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if self.available_flops is None:
            dtype = getattr(trainer.precision_plugin, "dtype", torch.float32)
            self.available_flops = get_available_flops(trainer.strategy.root_device, dtype)

    def _start(self, trainer: Trainer, stage: str) -> None:
        self._throughputs[stage] = Throughput(self.available_flops, trainer.world_size, self.window_size,
                                              self.separator)
        self._counts[stage] = [0, 0, 0]
        self._t0[stage] = time.perf_counter()

    def _flops(self, module: TrainModule) -> float | None:
        if self.flops_per_batch == _MEASURE:
            return self._measured
        if self.flops_per_batch is not None:
            return float(self.flops_per_batch)
        return getattr(module, "flops_per_batch", None)

    def _update(self, trainer: Trainer, module: TrainModule, batch: Any, stage: str) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        elapsed = time.perf_counter() - self._t0[stage]
        counts = self._counts[stage]
        counts[0] += 1
        counts[1] += int(self.batch_size_fn(batch))
        lengths = None
        length_fn = self.length_fn or getattr(module, "num_items", None)
        if length_fn is not None:
            counts[2] += int(length_fn(batch))
            lengths = counts[2]
        self._throughputs[stage].update(time=elapsed, batches=counts[0], samples=counts[1], lengths=lengths,
                                        flops=self._flops(module))

    def _log(self, trainer: Trainer, stage: str, step: int) -> None:
        metrics = self._throughputs[stage].compute()
        sep = self.separator
        for logger in trainer.loggers:
            logger.log_metrics({f"{stage}{sep}{k}": v for k, v in metrics.items()}, step=step)

    # ---- training ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.is_global_zero:
            self._start(trainer, "train")

    def on_train_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int) -> None:
        if (self.flops_per_batch == _MEASURE and self._measured is None and self._counter is None
                and trainer.is_global_zero):
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._measured, self._counter = float(self._counter.get_total_flops()), None
            self._t0["train"] = time.perf_counter()  # the counted batch ran slowly: rates start after it
        if not trainer.is_global_zero:
            return
        if self._flops(module) is None and self.available_flops and not self._warned_flops:
            self._warned_flops = True
            warnings.warn("ThroughputMonitor: set flops_per_batch (or module.flops_per_batch) to log FLOP/s and "
                          "MFU.", UserWarning, stacklevel=2)
        self._update(trainer, module, batch, "train")
        if trainer.sync_gradients and trainer.global_step % trainer.log_every_n_steps == 0:
            self._log(trainer, "train", trainer.global_step)

    # ---- evaluation ----------------------------------------------------------------------------------
    def _eval_batch_end(self, trainer: Trainer, module: TrainModule, batch: Any, stage: str) -> None:
        if not trainer.is_global_zero or getattr(trainer, "sanity_checking", False):
            return
        self._update(trainer, module, batch, stage)
        count = self._counts[stage][0]
        if count % trainer.log_every_n_steps == 0:
            self._log(trainer, stage, count)

    def on_validation_start(self, trainer: Trainer, module: TrainModule) -> None:
        self._val_started = time.perf_counter()
        if trainer.is_global_zero and not getattr(trainer, "sanity_checking", False):
            self._start(trainer, "validate")

    def on_validation_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(trainer, module, batch, "validate")

    def on_validation_end(self, trainer: Trainer, module: TrainModule) -> None:
        if "train" in self._t0 and self._val_started is not None:  # validation inside fit: not training time
            self._t0["train"] += time.perf_counter() - self._val_started
        self._val_started = None

    def on_test_start(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.is_global_zero:
            self._start(trainer, "test")

    def on_test_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._eval_batch_end(trainer, module, batch, "test")

    def on_predict_start(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.is_global_zero:
            self._start(trainer, "predict")

    def on_predict_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(trainer, module, batch, "predict")

    def on_train_end(self, trainer: Trainer, module: TrainModule) -> None:
        self._t0.pop("train", None)
