"""DeviceStatsMonitor: log device statistics around training/validation/test batches on logging steps.

CUDA devices: ``torch.cuda.memory_stats`` (allocator bytes, counts, ...). CPU: utilisation, memory and
swap percentages through psutil (``cpu_stats``). Keys are prefixed
``DeviceStatsMonitor.<hook>/<stat>`` as in Lightning.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from framework.hooks import Callback

if TYPE_CHECKING:
    import torch

    from framework.module import TrainModule
    from framework.trainer import Trainer


def get_cpu_stats() -> dict[str, float]:
    """CPU utilisation and memory/swap use in percent (psutil)."""
    import psutil

    return {"cpu_vm_percent": psutil.virtual_memory().percent, "cpu_percent": psutil.cpu_percent(),
            "cpu_swap_percent": psutil.swap_memory().percent}


def get_device_stats(device: torch.device) -> dict[str, float]:
    """The accelerator's own statistics for ``device``: CUDA allocator stats, XPU/MPS memory; {} for CPU."""
    import torch

    if device.type == "cuda":
        return {k: float(v) for k, v in torch.cuda.memory_stats(device).items() if isinstance(v, (int, float))}
    if device.type == "xpu" and hasattr(torch, "xpu"):
        return {k: float(v) for k, v in torch.xpu.memory_stats(device).items() if isinstance(v, (int, float))}
    if device.type == "mps":
        return {"mps.current_allocated_bytes": float(torch.mps.current_allocated_memory()),
                "mps.driver_allocated_bytes": float(torch.mps.driver_allocated_memory())}
    return {}


class DeviceStatsMonitor(Callback):
    """``cpu_stats``: None → CPU stats when training on CPU; True → also on accelerators; False → never."""

    def __init__(self, cpu_stats: bool | None = None) -> None:
        if cpu_stats is not None and not isinstance(cpu_stats, bool):
            raise TypeError(f"`cpu_stats` must be None, True or False, got {cpu_stats!r}.")
        self._cpu_stats = cpu_stats

    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise ValueError("Cannot use the DeviceStatsMonitor callback with Trainer(logger=False); pass a logger "
                             "or remove the callback.")
        wants_cpu = self._cpu_stats or (self._cpu_stats is None and trainer.strategy.root_device.type == "cpu")
        if wants_cpu and importlib.util.find_spec("psutil") is None:
            raise ModuleNotFoundError("DeviceStatsMonitor needs psutil for CPU stats: pip install psutil "
                                      "(or DeviceStatsMonitor(cpu_stats=False)).")

    def _log(self, trainer: Trainer, key: str) -> None:
        if (trainer.global_step + 1) % trainer.log_every_n_steps and not trainer.should_stop:
            return
        if not trainer.loggers:
            return
        device = trainer.strategy.root_device
        if self._cpu_stats is False and device.type == "cpu":
            return
        stats = get_device_stats(device)
        if device.type == "cpu" or self._cpu_stats:
            stats.update(get_cpu_stats())
        for logger in trainer.loggers:
            sep = getattr(logger, "group_separator", "/")
            logger.log_metrics({f"{type(self).__qualname__}.{key}{sep}{name}": value for name, value in stats.items()},
                               step=trainer.global_step)

    def on_train_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int) -> None:
        self._log(trainer, "on_train_batch_start")

    def on_train_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._log(trainer, "on_train_batch_end")

    def on_validation_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._log(trainer, "on_validation_batch_start")

    def on_validation_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._log(trainer, "on_validation_batch_end")

    def on_test_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._log(trainer, "on_test_batch_start")

    def on_test_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._log(trainer, "on_test_batch_end")
