"""ModelParallelStrategy: 2-D parallelism, FSDP2 over ``data_parallel`` × tensor parallelism over ``tensor_parallel``.

The processes form a 2-D ``DeviceMesh`` (dims ``"data_parallel"`` × ``"tensor_parallel"``, Lightning's
names), built when the process group starts and exposed as ``self.device_mesh`` on the module, so
``configure_model`` can apply ``parallelize_module(block, self.device_mesh["tensor_parallel"], plan)``
and, if it wants to choose the shard groups, ``fully_shard(block, mesh=self.device_mesh["data_parallel"])``.
When ``configure_model`` shards nothing itself, Kiln applies FSDP2 over ``data_parallel`` to every
element of the model's ``nn.ModuleList``s (the transformer blocks) and to the root.

Everything after the wrap is the FSDP machinery (``strategies.fsdp``): DCP checkpoints (sharded,
resharded to another mesh shape on load), full state dicts, mixed precision through FSDP2's
``MixedPrecisionPolicy``, gradient-sync suppression in accumulation windows. What differs:
data is sharded over ``data_parallel`` only (the ranks of one tensor-parallel group see the same
batch), gradient norms are computed per mesh (``clip_gradients``), and metrics reduce over
``data_parallel`` (``reduce_metric``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from strategies.activation_checkpointing import Policy, apply_activation_checkpointing, policy_matcher
from strategies.base import _local
from strategies.fsdp import FSDPStrategy, _materialize_meta
from strategies.parallel import _REDUCE_OPS, _StepDispatcher

if TYPE_CHECKING:
    from framework.module import TrainModule

DP, TP = "data_parallel", "tensor_parallel"


class ModelParallelStrategy(FSDPStrategy):
    """FSDP2 × tensor parallelism on a 2-D device mesh (Lightning's ``ModelParallelStrategy`` arguments).

    - ``data_parallel_size`` / ``tensor_parallel_size``: ints whose product is the world size, or
      ``"auto"``: with both auto, tensor parallelism spans the devices of a node and data parallelism
      the nodes; with one auto, it is the world size divided by the other.
    - ``save_distributed_checkpoint``: True writes sharded DCP checkpoints (every rank its shards; they
      load on any mesh shape); False gathers one full state dict on rank 0.
    - ``activation_checkpointing_policy``: module classes (or ``callable(module) -> bool``) whose forward
      is recomputed in backward instead of storing activations.
    - ``mixed_precision``: a ``MixedPrecisionPolicy``; by default derived from the Trainer's precision.
    """

    name = "model_parallel"

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = "auto",
                 save_distributed_checkpoint: bool = True, accelerator: str | None = None,
                 devices: int | None = None, num_nodes: int | None = None,
                 activation_checkpointing_policy: Policy = None, mixed_precision: Any = None,
                 reshard_after_forward: bool | int = True, process_group_backend: str | None = None,
                 timeout: timedelta = timedelta(minutes=30)) -> None:
        for name, value in (("data_parallel_size", data_parallel_size), ("tensor_parallel_size", tensor_parallel_size)):
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} is not valid; use an int >= 1 or 'auto'.")
        self._requested = (data_parallel_size, tensor_parallel_size)
        self._mesh_shape: tuple[int, int] | None = None
        self._defer_check = devices is None  # the Trainer's devices= arrive later (configure_topology)
        self._ac_match = policy_matcher(activation_checkpointing_policy)
        self.activation_checkpointing_policy = activation_checkpointing_policy
        super().__init__(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                         reshard_after_forward=reshard_after_forward, mixed_precision=mixed_precision,
                         state_dict_type="sharded" if save_distributed_checkpoint else "full",
                         process_group_backend=process_group_backend, timeout=timeout)
        self.save_distributed_checkpoint = save_distributed_checkpoint
        self._defer_check = False

    # ---- topology ---------------------------------------------------------------------------
    def configure_topology(self, accelerator: str, devices: int, num_nodes: int) -> None:
        super().configure_topology(accelerator, devices, num_nodes)
        if not self._defer_check:
            self._mesh_shape = self._resolve_mesh(self.num_devices * self.num_nodes)

    def _resolve_mesh(self, world: int) -> tuple[int, int]:
        dp, tp = self._requested
        if dp == "auto" and tp == "auto":
            dp, tp = self.num_nodes, world // self.num_nodes
        elif dp == "auto":
            dp = world // tp if world % tp == 0 else None
        elif tp == "auto":
            tp = world // dp if world % dp == 0 else None
        if dp is None or tp is None or dp * tp != world:
            given_dp, given_tp = self._requested
            raise ValueError(
                f"data_parallel_size={given_dp!r} x tensor_parallel_size={given_tp!r} does not divide the world "
                f"size {world} (devices x num_nodes = number of processes). Choose sizes whose product is {world} "
                f"(e.g. tensor_parallel_size={_divisor(world)}, data_parallel_size='auto') or change devices.")
        return dp, tp

    @property
    def data_parallel_size(self) -> int:
        return self._shape()[0]

    @property
    def tensor_parallel_size(self) -> int:
        return self._shape()[1]

    def _shape(self) -> tuple[int, int]:
        if self._mesh_shape is None:
            raise RuntimeError("The mesh shape is known once the number of processes is: pass devices= to the "
                               "strategy or give it to a Trainer(devices=...).")
        return self._mesh_shape

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        """Data is sharded over ``data_parallel`` only: the ranks of a tensor-parallel group share batches."""
        return {"num_replicas": self.data_parallel_size, "rank": self.global_rank // self.tensor_parallel_size}

    def setup_environment(self) -> None:
        """Start the process group, then build the ``data_parallel`` × ``tensor_parallel`` mesh (once)."""
        from torch.distributed.device_mesh import init_device_mesh

        super().setup_environment()
        self._mesh_shape = self._resolve_mesh(self.world_size)  # a launcher (torchrun) may set the world size
        if self.device_mesh is None or tuple(self.device_mesh.shape) != self._mesh_shape:
            self.device_mesh = init_device_mesh(self.root_device.type, self._mesh_shape, mesh_dim_names=(DP, TP))

    # ---- model ---------------------------------------------------------------------------------
    def wrap_module(self, module: TrainModule) -> nn.Module:
        """After ``configure_model`` (TP, maybe FSDP) and the base's shared preparation: checkpoint
        activations, shard what the user did not, shard the dispatcher root over ``data_parallel``,
        materialise meta parameters; returns the dispatcher."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is None:
            raise RuntimeError("ModelParallelStrategy.setup_module() needs the device mesh: call "
                               "setup_environment() first (the Trainer does).")
        self._check_tensor_parallel(module)
        self.precision.setup_sharded()
        _broadcast_plain_tensors(module)
        if self._ac_match is not None:
            apply_activation_checkpointing(module, self._ac_match)
        kwargs = self._shard_kwargs()
        if not any(isinstance(m, FSDPModule) for m in module.modules()):
            for block in default_blocks(module):
                fully_shard(block, **kwargs)
        dispatcher = _StepDispatcher(module)
        fully_shard(dispatcher, **kwargs)
        _materialize_meta(dispatcher, torch.device("cpu") if self.cpu_offload else self.root_device)
        self._sync_disabled = False
        return dispatcher

    def _shard_kwargs(self) -> dict[str, Any]:
        return {**super()._shard_kwargs(), "mesh": self.device_mesh[DP]}

    def _check_tensor_parallel(self, module: nn.Module) -> None:
        from torch.distributed.tensor import DTensor

        if self.tensor_parallel_size == 1 or any(isinstance(p, DTensor) for p in module.parameters()):
            return
        from framework.module import TrainModule

        defined = type(module).configure_model is not TrainModule.configure_model
        where = ("configure_model() ran but made no parameter tensor-parallel" if defined
                 else f"{type(module).__name__} does not define configure_model()")
        raise ValueError(
            f"tensor_parallel_size={self.tensor_parallel_size} but {where}. Kiln cannot choose a tensor-parallel "
            "plan for your layers: in configure_model() call parallelize_module(layer, "
            "self.device_mesh['tensor_parallel'], {'w1': ColwiseParallel(), 'w2': RowwiseParallel()}), or use "
            "tensor_parallel_size=1 (or strategy='fsdp') for data parallelism only.")

    # ---- gradients -----------------------------------------------------------------------------------
    def clip_gradients(self, optimizer: torch.optim.Optimizer, clip_val: float, algorithm: str) -> torch.Tensor | None:
        """Clip by the norm over all shards of all meshes (1-D ``data_parallel`` and 2-D parameters mix)."""
        self.precision.unscale_gradients(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return None
        norm = total_norm([p.grad for p in params])
        if algorithm == "norm":  # torch's formula, applied to the local shards (meshes differ between grads)
            coef = torch.clamp(clip_val / (norm + 1e-6), max=1.0)
            torch._foreach_mul_([_local(p.grad) for p in params], coef)
        else:
            torch.nn.utils.clip_grad_value_(params, clip_val)
        return norm

    # ---- collectives -----------------------------------------------------------------------------------
    def reduce_metric(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Reduce a logged value over ``data_parallel`` only: the ranks of a tensor-parallel group computed
        it from the same batch, so including them would count it ``tensor_parallel_size`` times in sums."""
        import torch.distributed as dist

        if op not in _REDUCE_OPS:
            raise ValueError(f"op={op!r} is not supported; use one of {_REDUCE_OPS}.")
        if self.data_parallel_size == 1:
            return tensor
        out = tensor.detach().clone() if tensor.is_floating_point() or op != "mean" else tensor.detach().double()
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                     "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(out, op=reduce_op, group=self.device_mesh[DP].get_group())
        if op == "mean":
            out /= self.data_parallel_size
        return out


def total_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients together, for DTensors on different meshes (FSDP-only parameters live on
    the 1-D ``data_parallel`` mesh, tensor-parallel ones on the 2-D mesh) and plain tensors."""
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for grad in grads:
        by_mesh.setdefault(getattr(grad, "device_mesh", None), []).append(grad)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def _broadcast_plain_tensors(module: nn.Module) -> None:
    """Give every rank rank 0's non-tensor-parallel parameters and buffers (as DDP does at wrap time):
    FSDP2 shards each rank's own copy, so differently seeded ranks would otherwise mix initialisations.
    Tensor-parallel (DTensor) parameters were already scattered from one rank by ``distribute_tensor``."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if not isinstance(tensor, DTensor) and not tensor.is_meta:
                dist.broadcast(tensor.data, src=0)


def default_blocks(module: nn.Module) -> list[nn.Module]:
    """The elements of the model's outermost ``nn.ModuleList``s that hold parameters: Kiln's FSDP groups."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for sub in module.modules():
        if id(sub) in inside or not isinstance(sub, nn.ModuleList):
            continue
        inside.update(id(m) for m in sub.modules())
        blocks.extend(block for block in sub if any(True for _ in block.parameters()))
    return blocks


def _divisor(world: int) -> int:
    return next((d for d in (2, 3, 5, 7) if world % d == 0), 1)
