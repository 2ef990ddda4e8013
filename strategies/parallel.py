"""ParallelStrategy: what DDP and FSDP share — one process per device over a torch.distributed group.

It finds (or launches) the job's processes, creates the process group (gloo on CPU, NCCL on CUDA),
publishes the topology in ``DistributedState``, implements the collectives, and routes every step
(training, validation, test, predict) through ``self.model`` — a wrapper around a ``_StepDispatcher``
whose ``forward`` calls the module's step method, so DDP's and FSDP's forward hooks fire for steps.

Ranks with different numbers of batches are kept in lockstep (see ``strategies.lockstep``), so uneven
data never deadlocks a collective and no sample is counted twice.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.launch import ClusterEnvironment, detect_environment, find_free_port, resolve_environment
from framework.precision import NO_CONTEXT
from framework.state import DistributedState
from strategies import lockstep
from strategies.base import Strategy

if TYPE_CHECKING:
    from framework.module import TrainModule

_REDUCE_OPS = ("sum", "mean", "max", "min")
_EVAL_STAGES = {"validation_step": "validate", "test_step": "test", "predict_step": "predict"}


class _StepDispatcher(nn.Module):
    """Root module for wrappers: ``forward(name, *args)`` calls ``module.<name>(*args)``; a callable instead
    of a name is called itself (a strategy's own step through the wrapper, e.g. ``strategies.ddp_buckets``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if callable(method):
            return method(*args, **kwargs)
        return getattr(self.module, method)(*args, **kwargs)


class ParallelStrategy(Strategy):
    """Base of the process-group strategies; subclasses implement ``wrap_module`` and ``no_sync``."""

    name = "parallel"

    def __init__(self, accelerator: str | None = None, devices: int | None = None, num_nodes: int | None = None,
                 process_group_backend: str | None = None, timeout: timedelta = timedelta(minutes=30)) -> None:
        if not isinstance(timeout, timedelta):
            raise TypeError(f"timeout={timeout!r} must be a datetime.timedelta, e.g. timedelta(minutes=30).")
        super().__init__()
        # What the constructor was not given comes from the Trainer (configure_topology).
        self._given = {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes}
        self.configure_topology(accelerator or ("cuda" if torch.cuda.is_available() else "cpu"), devices or 1,
                                num_nodes or 1)
        self.process_group_backend = process_group_backend
        self.timeout = timeout
        self.cluster: ClusterEnvironment = detect_environment()
        self._skip_sync = False
        self._manual = False  # manual optimization: backward runs inside the training step
        self._uneven: lockstep.UnevenTraining | None = None
        self._ghost = lockstep.GhostFlag()
        self._eval_plans: dict[str, list[lockstep.EvalPlan | None]] = {}

    def configure_topology(self, accelerator: str, devices: int, num_nodes: int) -> None:
        """Take the Trainer's ``accelerator``/``devices``/``num_nodes`` for what the constructor left unset.

        ``Trainer(strategy=DDPStrategy(static_graph=True), devices=2)`` then means two processes.
        """
        accelerator = self._given["accelerator"] or accelerator
        if accelerator not in ("cpu", "cuda"):
            raise ValueError(f"accelerator={accelerator!r} is not supported by strategy={self.name!r}; use 'cpu' "
                             "(gloo) or 'cuda' (NCCL).")
        for name, value in (("devices", self._given["devices"] or devices),
                            ("num_nodes", self._given["num_nodes"] or num_nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid for strategy={self.name!r}; use an int >= 1.")
        self.accelerator = accelerator
        self.num_devices = self._given["devices"] or devices
        self.num_nodes = self._given["num_nodes"] or num_nodes
        self._root_device = torch.device(accelerator)

    # ---- topology --------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.cluster.world_size if self.cluster.launched else self.num_devices * self.num_nodes

    @property
    def global_rank(self) -> int:
        return self.cluster.global_rank

    @property
    def local_rank(self) -> int:
        return self.cluster.local_rank

    @property
    def backend(self) -> str:
        return self.process_group_backend or ("nccl" if self.accelerator == "cuda" else "gloo")

    @property
    def in_ghost_step(self) -> bool:
        """True while a ghost step runs: a repeat of this rank's last batch that keeps uneven ranks in
        lockstep and contributes nothing (zero loss weight, zero-weight logs); see ``strategies.lockstep``."""
        return self._ghost.active

    def setup_environment(self) -> None:
        """Find or start the job's processes, create the process group and publish the topology."""
        import torch.distributed as dist

        self.cluster = resolve_environment(self.num_devices, self.num_nodes)
        if self.accelerator == "cuda":
            self._root_device = torch.device("cuda", self.cluster.local_rank)
            torch.cuda.set_device(self._root_device)
        if not dist.is_initialized():
            if not self.cluster.launched:  # a one-process group: still give it a rendezvous address
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(find_free_port()))
            else:
                os.environ.setdefault("MASTER_ADDR", self.cluster.master_addr)
                os.environ.setdefault("MASTER_PORT", str(self.cluster.master_port))
            from framework.elastic import (
                process_group_store,  # torchrun restarts: a fresh key namespace per round
            )

            store = process_group_store(self.cluster.global_rank, self.cluster.world_size, self.timeout)
            dist.init_process_group(self.backend, init_method=None if store is not None else "env://", store=store,
                                    rank=self.cluster.global_rank, world_size=self.cluster.world_size,
                                    timeout=self.timeout)
            atexit.register(_destroy_process_group)
        elif dist.get_world_size() != self.cluster.world_size:
            raise RuntimeError(f"A process group of {dist.get_world_size()} processes already exists, but this "
                               f"job has {self.cluster.world_size}; destroy it first.")
        DistributedState._reset_state()
        DistributedState(num_processes=self.world_size, process_index=self.global_rank,
                         local_process_index=self.local_rank, device=self.root_device,
                         backend=dist.get_backend())
        self._eval_plans = {}

    # ---- model -------------------------------------------------------------------------------
    def wrap_module(self, module: TrainModule) -> nn.Module:
        """Wrap a ``_StepDispatcher(module)`` (DDP(...), fully_shard(...)); every subclass defines its own,
        since running steps on the bare module would skip gradient synchronisation."""
        raise TypeError(f"{type(self).__name__} must define wrap_module(module) to be used as a ParallelStrategy.")

    def step_function(self, name: str) -> Callable[..., Any]:
        if name == "training_step":
            self._manual = not self.module.automatic_optimization
        step = partial(self.model, name) if self.model is not self.module else getattr(self.module, name)
        if name == "training_step" and self._uneven is not None:
            return self._uneven.wrap_step(step, self.module)
        plans = self._eval_plans.get(_EVAL_STAGES.get(name, ""))
        if plans and any(plans):
            return lockstep.wrap_eval_step(step, plans, self.module, self._ghost)
        return step

    # ---- backward ------------------------------------------------------------------------------
    def no_sync(self, skip_sync: bool) -> AbstractContextManager:
        self._skip_sync = skip_sync
        return NO_CONTEXT

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self._uneven is not None and self._uneven.step_is_ghost:
            loss = loss * 0  # a ghost step (uneven data) contributes nothing, manual optimization included
        self.precision.backward(loss, *args, **kwargs)
        self._after_backward()
        if self._uneven is not None and not self._skip_sync:
            factor = self._uneven.gradient_factor()
            if factor != 1.0:
                self.scale_gradients(self.optimizers, factor)

    def _after_backward(self) -> None:
        """Hook for strategies that synchronise gradients themselves after a backward."""

    # ---- data ------------------------------------------------------------------------------------
    def process_dataloader(self, dataloader: Any, *, stage: str, seed: int, use_distributed_sampler: bool,
                           even_batches: bool, limit_batches: int | float | None = None) -> Any:
        """Shard the loader; evaluation is never padded, and uneven ranks are kept in lockstep."""
        if stage == "fit":
            loader = super().process_dataloader(dataloader, stage=stage, seed=seed, even_batches=even_batches,
                                                use_distributed_sampler=use_distributed_sampler)
            self._uneven = None
            lengths = self._lengths(loader) if self.world_size > 1 and not even_batches else None
            if lengths is not None and len(set(lengths)) > 1:
                self._uneven = lockstep.UnevenTraining(lengths, self.global_rank, self.module, self._ghost)
                loader = self._uneven.wrap_loader(loader)
            return loader
        loader = super().process_dataloader(dataloader, stage=stage, seed=seed, even_batches=False,
                                            use_distributed_sampler=use_distributed_sampler)
        plan = None
        lengths = self._lengths(loader) if self.world_size > 1 else None
        if lengths is not None and len(set(lengths)) > 1:
            plan = lockstep.EvalPlan.create(lengths, self.global_rank, limit_batches)
            if plan is None:  # a rank would get no batch at all: pad (repeat samples) rather than hang
                from framework.data import prepare_dataloader

                warnings.warn(f"The {stage} data has fewer samples than processes ({self.world_size}); samples are "
                              "repeated so that every rank runs a step, which weights them twice in metrics.",
                              stacklevel=2)
                loader = prepare_dataloader(dataloader, **self.distributed_sampler_kwargs, seed=seed,
                                            use_distributed_sampler=use_distributed_sampler,
                                            even_batches=True, shuffle=False)
        self._eval_plans.setdefault(stage, []).append(plan if plan is not None and plan.extra else None)
        return loader

    def _lengths(self, loader: Any) -> list[int] | None:
        """Batches per rank (None when some rank's loader has no length)."""
        try:
            mine = len(loader)
        except TypeError:
            mine = None
        lengths = self.all_gather_object(mine)
        return None if any(n is None for n in lengths) else lengths

    # ---- collectives -------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        import torch.distributed as dist

        if op not in _REDUCE_OPS:
            raise ValueError(f"op={op!r} is not supported; use one of {_REDUCE_OPS}.")
        if self.world_size == 1:
            return tensor
        out = tensor.detach().clone() if tensor.is_floating_point() or op != "mean" else tensor.detach().double()
        moved = out.device != self.root_device and self.backend == "nccl"
        if moved:
            out = out.to(self.root_device)
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                     "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(out, op=reduce_op)
        if op == "mean":
            out /= self.world_size
        return out.to(tensor.device) if moved else out

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world_size == 1:
            return tensor.unsqueeze(0)
        tensor = tensor.detach().contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        import torch.distributed as dist

        if self.world_size == 1:
            return obj
        if isinstance(obj, torch.Tensor):
            out = obj.detach().clone()
            dist.broadcast(out, src)
            return out
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self, name: str | None = None) -> None:
        import torch.distributed as dist

        if self.world_size > 1:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.root_device.index])
            else:
                dist.barrier()

    def teardown(self) -> None:
        """Keep the wrapper and the process group for later stages (validate/test/save after fit).

        The group is destroyed when the process exits; ``destroy_process_group()`` does it earlier.
        """
        if self._uneven is not None:
            self._uneven.restore_module()

    @staticmethod
    def destroy_process_group() -> None:
        """Destroy the default process group now (it is otherwise destroyed at exit)."""
        _destroy_process_group()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if hasattr(sys, "last_value"):  # an unhandled error: peers may be gone, so nobody is waited for
        # Its traceback holds the frames that hold the Trainer, its DDP wrapper and their references to the
        # group; freed only during interpreter finalization, gloo's threads then abort the process ("terminate
        # called without an active exception", exit -6 instead of 1). Free them while Python still runs.
        sys.last_type = sys.last_value = sys.last_traceback = None
        if hasattr(sys, "last_exc"):
            sys.last_exc = None
        gc.collect()
    elif dist.get_backend() == "gloo":
        # Ranks that end normally meet first: a gloo group torn down while a peer is still tearing down its
        # own can abort the process the same way.
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        except Exception:  # a peer already left: nothing to coordinate with
            pass
    dist.destroy_process_group()
