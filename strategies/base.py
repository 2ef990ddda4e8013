"""The Strategy base: where a model lives, how it is wrapped, and how processes talk.

A Strategy owns the process group, device placement, wrapping (DDP, FSDP, DeepSpeed engine),
collectives, gradient-sync suppression inside accumulation windows, and the checkpoint layout of its
state. Numerics are delegated to the Precision plugin: a Strategy calls ``precision.backward`` and
``precision.optimizer_step`` and never inspects dtypes. The Trainer talks to every strategy through
this interface only, so the loop has no ``isinstance(strategy, ...)`` branches.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from framework.precision import Precision
from framework.state import DistributedState

if TYPE_CHECKING:
    from framework.module import TrainModule

_NULL = nullcontext()


class Strategy:
    """Base and single-process behaviour; subclasses override what their layout changes."""

    name: str = "base"
    #: True when the strategy shards parameters/optimizer state (checkpoints then go through its own writer).
    is_sharded: bool = False

    def __init__(self, accelerator: str = "cpu", devices: int = 1, num_nodes: int = 1) -> None:
        self.accelerator = accelerator
        self.num_devices = devices
        self.num_nodes = num_nodes
        self.precision: Precision = Precision()
        self.module: TrainModule | None = None
        self.model: nn.Module | None = None  # what forward passes go through (wrapper or module itself)
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

    def setup_environment(self) -> None:
        """Create the process group (if any) and publish the topology in DistributedState."""
        DistributedState._reset_state()
        DistributedState(num_processes=self.world_size, process_index=self.global_rank,
                         local_process_index=self.local_rank, device=self.root_device, backend=None)

    # ---- model and optimizers ------------------------------------------------------------------
    def setup_module(self, module: TrainModule) -> None:
        """Place, convert and wrap the module; sets ``self.module`` and ``self.model``."""
        check_not_dispatched(module, self.name)
        module = self.precision.convert_module(module)
        module.to(self.root_device)
        self.module = module
        self.model = module

    def setup_optimizers(self, optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
        """Give the strategy a chance to wrap optimizers (DeepSpeed builds its engine here)."""
        return optimizers

    def step_function(self, name: str) -> Callable[..., Any]:
        """The callable the loop uses for ``training_step``/``validation_step``/... (bound once per run)."""
        return getattr(self.module, name)

    def batch_to_device(self, batch: Any) -> Any:
        return move_to_device(batch, self.root_device)

    @property
    def needs_batch_transfer(self) -> bool:
        """False when batches already live where the model does (CPU training): the loop skips the move."""
        return self.root_device.type != "cpu"

    # ---- backward and step ----------------------------------------------------------------------
    def no_sync(self, skip_sync: bool) -> AbstractContextManager:
        """Context for a micro-batch's forward+backward; ``skip_sync`` inside an accumulation window."""
        return _NULL

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.backward(loss)

    def clip_gradients(self, optimizer: torch.optim.Optimizer, clip_val: float, algorithm: str) -> torch.Tensor | None:
        """Clip this optimizer's gradients after unscaling; returns the total norm for ``"norm"``."""
        self.precision.unscale_gradients(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return None
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, clip_val)
            return None
        return torch.nn.utils.clip_grad_norm_(params, clip_val)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step one optimizer through the precision plugin; False when the step was skipped."""
        return self.precision.optimizer_step(optimizer)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def scale_gradients(self, optimizers: list[torch.optim.Optimizer], factor: float | torch.Tensor) -> None:
        """Multiply accumulated gradients (used for short tail windows of unknown length and num_items)."""
        grads = [p.grad for opt in optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    # ---- collectives (identity on one process) -------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Gather to a new leading dimension of size world_size."""
        return tensor.unsqueeze(0)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self, name: str | None = None) -> None: ...

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision

    # ---- checkpoint state ---------------------------------------------------------------------------------
    def module_state_dict(self) -> dict[str, Any]:
        """Full (unsharded) model state dict; sharded strategies override."""
        return self.module.state_dict()

    def load_module_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        self.module.load_state_dict(state_dict, strict=strict)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        optimizer.load_state_dict(state_dict)

    def process_dataloader(self, dataloader: Any, *, stage: str, seed: int, use_distributed_sampler: bool,
                           even_batches: bool) -> Any:
        """Shard a dataloader across ranks and make its order resumable (framework.data does the work)."""
        from framework.data import prepare_dataloader

        # Evaluation is never padded: duplicated samples would distort sync_dist metrics. Strategies whose
        # evaluation forward is itself collective (FSDP) override this to keep ranks in lockstep.
        return prepare_dataloader(dataloader, num_replicas=self.world_size, rank=self.global_rank, seed=seed,
                                  use_distributed_sampler=use_distributed_sampler,
                                  even_batches=even_batches if stage == "fit" else False,
                                  shuffle=None if stage == "fit" else False)

    def teardown(self) -> None:
        """Release wrappers and process groups; the module stays usable afterwards."""
        self.model = self.module


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Recursively move tensors in a batch (tensors, mappings, sequences, namedtuples, dataclass-like)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return type(batch)((k, move_to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    to = getattr(batch, "to", None)
    if callable(to):
        return to(device)
    return batch


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
