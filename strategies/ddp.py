"""DDPStrategy: data parallel training with torch's DistributedDataParallel (gloo on CPU, NCCL on CUDA).

Every rank holds the whole model; DDP averages gradients during backward. Steps run through DDP's
forward (via a dispatcher module), so its reducer is prepared for each training step; inside an
accumulation window ``no_sync`` skips the all-reduce and the closing micro-batch syncs the window.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

from torch import nn

from strategies.base import _NULL
from strategies.parallel import ParallelStrategy, _StepDispatcher


class DDPStrategy(ParallelStrategy):
    """One process per device, full model replicas, gradients all-reduced by DDP.

    ``find_unused_parameters``/``static_graph`` and any other ``ddp_kwargs`` (``bucket_cap_mb``,
    ``gradient_as_bucket_view``, ...) go to ``torch.nn.parallel.DistributedDataParallel``.
    """

    name = "ddp"

    def __init__(self, accelerator: str | None = None, devices: int | None = None, num_nodes: int | None = None,
                 find_unused_parameters: bool = False, static_graph: bool = False,
                 process_group_backend: str | None = None, timeout: timedelta = timedelta(minutes=30),
                 **ddp_kwargs: Any) -> None:
        super().__init__(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph
        self.ddp_kwargs = ddp_kwargs

    def _wrap(self, dispatcher: _StepDispatcher) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        return DistributedDataParallel(dispatcher, device_ids=device_ids,
                                       find_unused_parameters=self.find_unused_parameters,
                                       static_graph=self.static_graph, **self.ddp_kwargs)

    def no_sync(self, skip_sync: bool) -> AbstractContextManager:
        self._skip_sync = skip_sync
        return self.model.no_sync() if skip_sync else _NULL
