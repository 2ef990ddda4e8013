"""DDPStrategy: data parallel training with torch's DistributedDataParallel (gloo on CPU, NCCL on CUDA).

Every rank holds the whole model; DDP averages gradients during backward. Steps run through DDP's
forward (via a dispatcher module), so its reducer is prepared for each training step; inside an
accumulation window ``no_sync`` skips the all-reduce and the closing micro-batch syncs the window.

A resumed run reduces with the saved run's bucket layout from its first step (``strategies.ddp_buckets``),
so resume is bit-exact at any number of ranks.

Manual optimization calls backward *inside* the training step, before DDP's forward has returned and
armed its reducer; there the step runs on the module directly and each ``manual_backward`` averages the
gradients across ranks itself (one flat all-reduce per dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.precision import NO_CONTEXT
from strategies.ddp_buckets import BucketOrder
from strategies.parallel import ParallelStrategy, _StepDispatcher

if TYPE_CHECKING:
    from framework.module import TrainModule


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
        self._buckets: BucketOrder | None = None
        self._ddp_syncs = True  # whether DDP all-reduces in the running backward
        self._synchronised = False  # whether this wrapper has all-reduced once (or replayed a saved run)

    def wrap_module(self, module: TrainModule) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        module.to(self.root_device)
        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        ddp = DistributedDataParallel(_StepDispatcher(module), device_ids=device_ids,
                                      find_unused_parameters=self.find_unused_parameters,
                                      static_graph=self.static_graph, **self.ddp_kwargs)
        self._buckets = BucketOrder(ddp, static_graph=self.static_graph,
                                    find_unused_parameters=self.find_unused_parameters)
        self._synchronised = False
        return ddp

    def no_sync(self, skip_sync: bool) -> AbstractContextManager:
        self._skip_sync = skip_sync
        # torch's static_graph fails (an internal assert) when its first iteration runs under no_sync, so
        # until one backward has synchronised, micro-batches synchronise too (the same mean, more all-reduces).
        self._ddp_syncs = not skip_sync or (self.static_graph and not self._synchronised)
        return NO_CONTEXT if self._ddp_syncs else self.model.no_sync()

    def step_function(self, name: str) -> Callable[..., Any]:
        if name != "training_step" or self.module.automatic_optimization:
            return super().step_function(name)
        self._buckets.stop()  # manual steps bypass DDP's reducer: no bucket order to record
        model, self.model = self.model, self.module  # the base then binds the module's own method
        try:
            return super().step_function(name)
        finally:
            self.model = model

    def _after_backward(self) -> None:
        if self._manual:  # steps run on the module itself: DDP's reducer (and its buckets) is not involved
            if self.world_size > 1 and not self._skip_sync:  # skipped inside optimizer.toggle_model(sync_grad=False)
                average_gradients([p for p in self.module.parameters() if p.requires_grad], self.world_size)
        else:
            if self._buckets.recording:
                self._buckets.after_backward(synchronised=self._ddp_syncs)
            self._synchronised = self._synchronised or self._ddp_syncs

    # ---- checkpoint state: DDP's bucket order, so a resume reduces exactly as the saved run did ----------
    def strategy_state(self) -> dict[str, Any]:
        return self._buckets.state_dict() if self._buckets is not None and not self._manual else {}

    def load_strategy_state(self, state: dict[str, Any]) -> None:
        if self._buckets is not None and not self._manual:
            self._synchronised = self._buckets.replay(state) or self._synchronised


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce-average the gradients of ``params`` (a missing gradient counts as zeros) in flat buffers."""
    import torch.distributed as dist

    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for group in groups.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        for p, chunk in zip(group, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).clone() if p.grad is None else p.grad.copy_(chunk.view_as(p))
