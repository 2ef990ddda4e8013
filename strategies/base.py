"""The Strategy base: where a model lives, how it is wrapped, and how processes talk.

A Strategy owns the process group, device placement, wrapping (DDP, FSDP, DeepSpeed engine),
collectives, gradient-sync suppression inside accumulation windows, and the checkpoint layout of its
state. Numerics are delegated to the Precision plugin: a Strategy calls ``precision.backward`` and
``precision.optimizer_step`` and never inspects dtypes. The Trainer talks to every strategy through
this interface only, so the loop has no ``isinstance(strategy, ...)`` branches.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.precision import NO_CONTEXT, Precision
from framework.state import DistributedState
from strategies.checkpoints import StrategyCheckpoints

if TYPE_CHECKING:
    from framework.module import TrainModule


class Strategy(StrategyCheckpoints):
    """Base and single-process behaviour; subclasses override what their layout changes."""

    name: str = "base"
    #: True when the strategy shards parameters/optimizer state (checkpoints then go through its own writer).
    is_sharded: bool = False
    #: True while a process-group strategy runs a ghost step: a repeat of this rank's last batch that keeps
    #: ranks with uneven data in lockstep and contributes nothing (see strategies.lockstep).
    in_ghost_step: bool = False

    def __init__(self, accelerator: str = "cpu", devices: int = 1, num_nodes: int = 1) -> None:
        self.accelerator = accelerator
        self.num_devices = devices
        self.num_nodes = num_nodes
        self.precision: Precision = Precision()
        self.module: TrainModule | None = None
        self.model: nn.Module | None = None  # what forward passes go through (wrapper or module itself)
        self.optimizers: list[torch.optim.Optimizer] = []
        self._root_device = torch.device("cpu")

    # ---- topology ---------------------------------------------------------------------------
    @property
    def root_device(self) -> torch.device:
        return self._root_device

    @property
    def world_size(self) -> int:
        return 1

    @property
    def global_rank(self) -> int:
        return 0

    @property
    def local_rank(self) -> int:
        return 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        """How data is sharded: ``num_replicas``/``rank`` of this process among the data-parallel replicas."""
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup_environment(self) -> None:
        """Create the process group (if any) and publish the topology in DistributedState."""
        DistributedState._reset_state()
        DistributedState(num_processes=self.world_size, process_index=self.global_rank,
                         local_process_index=self.local_rank, device=self.root_device, backend=None)

    def connect_precision(self, precision: Precision) -> Precision:
        """Adopt the Trainer's precision plugin; a strategy whose engine owns numerics returns its own."""
        self.precision = precision
        return precision

    # ---- model and optimizers ------------------------------------------------------------------
    def setup_module(self, module: TrainModule) -> None:
        """Prepare the module once for every strategy (refuse a dispatched model, convert it to the
        precision's dtype), then let ``wrap_module`` place and wrap it. Sets ``self.module``/``self.model``."""
        check_not_dispatched(module, self.name)
        module = self.precision.convert_module(module)
        self.module = module
        self.model = self.wrap_module(module)

    def wrap_module(self, module: TrainModule) -> nn.Module:
        """The per-strategy hook: place ``module`` and return what forward passes go through
        (the module itself here; a DDP/FSDP wrapper, an engine, ... in subclasses)."""
        return module.to(self.root_device)

    def setup_optimizers(self, optimizers: list[torch.optim.Optimizer], *, gradient_clip_val: float | None = None,
                         gradient_clip_algorithm: str = "norm") -> list[torch.optim.Optimizer]:
        """Give the strategy a chance to wrap optimizers (DeepSpeed builds its engine here, and takes the
        Trainer's clipping settings into it; other strategies clip in ``clip_gradients``)."""
        self.optimizers = optimizers
        return optimizers

    def step_function(self, name: str) -> Callable[..., Any]:
        """The callable the loop uses for ``training_step``/``validation_step``/... (bound once per run)."""
        return getattr(self.module, name)

    def batch_to_device(self, batch: Any) -> Any:
        from framework.batch_transfer import move_data_to_device

        return move_data_to_device(batch, self.root_device)

    @property
    def needs_batch_transfer(self) -> bool:
        """False when batches already live where the model does (CPU training): the loop skips the move."""
        return self.root_device.type != "cpu"

    # ---- backward and step ----------------------------------------------------------------------
    @property
    def adds_nothing_to_steps(self) -> bool:
        """True when neither this strategy nor its precision plugin refines ``no_sync``, ``zero_grad``,
        ``backward`` or ``optimizer_step`` (one device, 32-bit): the loop's plain step then calls
        ``optimizer.zero_grad``, ``loss.backward`` and ``optimizer.step`` itself, with the same effect."""
        cls = type(self)
        return self.precision.adds_nothing_to_steps and all(
            getattr(cls, name) is getattr(Strategy, name) for name in ("no_sync", "zero_grad", "backward",
                                                                       "optimizer_step"))

    def no_sync(self, skip_sync: bool) -> AbstractContextManager:
        """Context for a micro-batch's forward+backward; ``skip_sync`` inside an accumulation window."""
        return NO_CONTEXT

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward through the precision plugin; ``args``/``kwargs`` (incl. ``backward_fn``) go on to it."""
        self.precision.backward(loss, *args, **kwargs)

    def clip_gradients(self, optimizer: torch.optim.Optimizer, clip_val: float, algorithm: str) -> torch.Tensor | None:
        """Clip this optimizer's true (unscaled) gradients by ``"norm"`` or ``"value"``.

        Returns the total 2-norm of the gradients before clipping (for either algorithm; None when no
        parameter has a gradient). Sharded strategies override this with a norm over all shards.
        """
        self.precision.unscale_gradients(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return None
        if algorithm == "norm":
            return torch.nn.utils.clip_grad_norm_(params, clip_val)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grad_value_(params, clip_val)
        return norm

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None,
                       **kwargs: Any) -> bool:
        """Step one optimizer through the precision plugin; False when the step was skipped. ``closure`` and
        ``kwargs`` go to ``optimizer.step`` (Lightning's ``opt.step(closure=..., **kwargs)``)."""
        if closure is None and not kwargs:
            return self.precision.optimizer_step(optimizer)
        return self.precision.optimizer_step(optimizer, closure, **kwargs)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def scale_gradients(self, optimizers: list[torch.optim.Optimizer], factor: float | torch.Tensor) -> None:
        """Multiply the accumulated gradients of ``optimizers``' parameters by ``factor`` (short tail windows
        of unknown length, ``num_items``, uneven data). The one place gradients are rescaled."""
        grads = [_local(p.grad) for opt in optimizers for g in opt.param_groups for p in g["params"]
                 if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    # ---- collectives (identity on one process) -------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return tensor

    def reduce_metric(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Reduce a logged value with ``sync_dist`` over the ranks that hold different data (all of them here)."""
        return self.all_reduce(tensor, op)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Gather to a new leading dimension of size world_size."""
        return tensor.unsqueeze(0)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self, name: str | None = None) -> None: ...

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """Whether ``decision`` holds on every rank (``all=True``) or on any rank (``all=False``)."""
        if self.world_size == 1:
            return bool(decision)
        votes = self.all_reduce(torch.tensor(int(bool(decision)), device=self.root_device), "sum")
        votes = int(votes.item())
        return votes == self.world_size if all else votes > 0

    def process_dataloader(self, dataloader: Any, *, stage: str, seed: int, use_distributed_sampler: bool,
                           even_batches: bool, limit_batches: int | float | None = None) -> Any:
        """Shard a dataloader across ranks and make its order resumable (framework.data does the work).

        ``limit_batches`` is the Trainer's ``limit_<stage>_batches`` (strategies that keep uneven ranks in
        lockstep need the number of batches each rank will actually run)."""
        from framework.data import prepare_dataloader

        # Evaluation is never padded: duplicated samples would distort sync_dist metrics. Strategies whose
        # evaluation forward is itself collective (FSDP) override this to keep ranks in lockstep.
        return prepare_dataloader(dataloader, **self.distributed_sampler_kwargs, seed=seed,
                                  use_distributed_sampler=use_distributed_sampler,
                                  even_batches=even_batches if stage == "fit" else False,
                                  shuffle=None if stage == "fit" else False)

    def teardown(self) -> None:
        """Release wrappers and process groups; the module stays usable afterwards."""
        self.model = self.module


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP gradients), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def check_not_dispatched(module: nn.Module, strategy_name: str) -> None:
    """Refuse a model already split across devices (``device_map``) for strategies that place it themselves."""
    device_map = getattr(module, "hf_device_map", None)
    devices = {p.device for p in module.parameters()} | {b.device for b in module.buffers()}
    devices.discard(torch.device("meta"))
    spread = len(device_map and set(device_map.values()) or ()) > 1 or len(devices) > 1
    if spread:
        where = sorted(str(d) for d in (set(device_map.values()) if device_map else devices))
        raise ValueError(
            f"The model is already dispatched across several devices ({', '.join(where)}), e.g. loaded with "
            f"device_map='auto'. strategy={strategy_name!r} places the whole model on each process itself. Load "
            "the model without device_map (on CPU or one device) or train it without a distributed strategy."
        )
