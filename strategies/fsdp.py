"""FSDPStrategy: fully sharded data parallel with torch's FSDP2 (``fully_shard``, DTensor parameters).

Each rank keeps 1/world of every parameter, gradient and optimizer state; parameters are all-gathered
for a module's forward/backward and gradients reduce-scattered. Submodules chosen by
``auto_wrap_policy`` become their own shard groups (gathered one at a time, so peak memory stays low);
the root group is a dispatcher around the TrainModule, so every step method runs under FSDP's root
hooks. The Trainer builds optimizers after ``setup_module``, so they hold the sharded parameters.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.precision import NO_CONTEXT
from strategies.parallel import ParallelStrategy, _StepDispatcher

if TYPE_CHECKING:
    from framework.module import TrainModule

_STATE_DICT_TYPES = ("sharded", "full")


class FSDPStrategy(ParallelStrategy):
    """Shard parameters, gradients and optimizer state across ranks with FSDP2.

    - ``auto_wrap_policy``: None (one shard group for the whole model), a set of module classes (each
      instance becomes a group, e.g. ``{TransformerBlock}``), or ``callable(module) -> bool``.
      A module whose parameters are shared with modules outside it (tied weights) stays in its
      parent's group, so ties keep working.
    - ``parallelize_fn(module, device_mesh)``: apply ``fully_shard`` (and e.g. tensor parallelism)
      yourself instead; the dispatcher root is sharded afterwards.
    - ``reshard_after_forward``: free gathered parameters after forward (less memory, one more
      all-gather in backward). ``cpu_offload``: keep shards and optimizer state on the CPU.
    - ``mixed_precision``: a ``torch.distributed.fsdp.MixedPrecisionPolicy``; by default derived from the
      Trainer's precision (``"bf16-mixed"``/``"16-mixed"``: parameters cast for compute, gradients
      reduced in float32).
    - ``state_dict_type``: ``"sharded"`` checkpoints (each rank writes its shards through
      ``torch.distributed.checkpoint``) or ``"full"`` (one consolidated model file).
    Other keyword arguments go to ``fully_shard``.
    """

    name = "fsdp"
    is_sharded = True

    def __init__(self, accelerator: str | None = None, devices: int | None = None, num_nodes: int | None = None,
                 auto_wrap_policy: set[type[nn.Module]] | Callable[[nn.Module], bool] | None = None,
                 parallelize_fn: Callable[[nn.Module, Any], Any] | None = None,
                 reshard_after_forward: bool | int = True, cpu_offload: bool = False, mixed_precision: Any = None,
                 state_dict_type: str = "sharded", process_group_backend: str | None = None,
                 timeout: timedelta = timedelta(minutes=30), **fsdp_kwargs: Any) -> None:
        super().__init__(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                         process_group_backend=process_group_backend, timeout=timeout)
        if state_dict_type not in _STATE_DICT_TYPES:
            raise ValueError(f"state_dict_type={state_dict_type!r} is not valid; use 'sharded' (each rank writes "
                             "its shards) or 'full' (one consolidated state dict).")
        self._wrap_match = _policy_matcher(auto_wrap_policy)
        if parallelize_fn is not None and auto_wrap_policy is not None:
            raise ValueError("Pass either auto_wrap_policy or parallelize_fn, not both: parallelize_fn applies "
                             "fully_shard itself.")
        self.auto_wrap_policy = auto_wrap_policy
        self.parallelize_fn = parallelize_fn
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.mixed_precision = mixed_precision
        self.state_dict_type = state_dict_type
        self.fsdp_kwargs = fsdp_kwargs
        self.device_mesh: Any = None
        self._sync_disabled = False

    # ---- model ---------------------------------------------------------------------------------
    def wrap_module(self, module: TrainModule) -> nn.Module:
        """Shard the module's groups and a dispatcher root around it; meta parameters are materialised
        per shard (the module is not moved as a whole first: that would allocate every full parameter)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.precision.setup_sharded()
        self.device_mesh = init_device_mesh(self.root_device.type, (self.world_size,))
        kwargs = self._shard_kwargs()
        dispatcher = _StepDispatcher(module)
        if self.parallelize_fn is not None:
            self.parallelize_fn(module, self.device_mesh)
        else:
            for target in _wrap_targets(module, self._wrap_match):
                fully_shard(target, **kwargs)
        fully_shard(dispatcher, **kwargs)
        _materialize_meta(dispatcher, torch.device("cpu") if self.cpu_offload else self.root_device)
        self._sync_disabled = False
        return dispatcher

    def _shard_kwargs(self) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        offload = CPUOffloadPolicy(pin_memory=self.root_device.type == "cuda") if self.cpu_offload else OffloadPolicy()
        return {"mesh": self.device_mesh, "reshard_after_forward": self.reshard_after_forward,
                "mp_policy": self.mixed_precision_policy(), "offload_policy": offload, **self.fsdp_kwargs}

    def mixed_precision_policy(self) -> Any:
        """The policy given, or one derived from the precision plugin ("bf16-mixed"/"16-mixed")."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.mixed_precision is not None:
            return self.mixed_precision
        if self.precision.name in ("bf16-mixed", "16-mixed"):
            return MixedPrecisionPolicy(param_dtype=self.precision.dtype, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    # ---- backward and step ----------------------------------------------------------------------
    def no_sync(self, skip_sync: bool) -> AbstractContextManager:
        self._skip_sync = skip_sync
        if skip_sync != self._sync_disabled:
            self.model.set_requires_gradient_sync(not skip_sync)
            self._sync_disabled = skip_sync
        return NO_CONTEXT

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self._manual:
            # Manual optimization runs backward inside the root's forward, before FSDP's post-forward has
            # hooked the outputs; hook the loss so the root's pre-backward (unshard, final reduce-scatter
            # callback) still runs.
            self.model._get_fsdp_state()._register_pre_backward_hook(loss)
        super().backward(loss, *args, **kwargs)

    def clip_gradients(self, optimizer: torch.optim.Optimizer, clip_val: float, algorithm: str) -> torch.Tensor | None:
        """Clip by the norm over all shards (DTensor gradients); returns that total norm."""
        self.precision.unscale_gradients(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return None
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if algorithm == "norm":
            torch.nn.utils.clip_grads_with_norm_(params, clip_val, norm)
        else:
            torch.nn.utils.clip_grad_value_(params, clip_val)
        return norm

    # ---- state dicts -----------------------------------------------------------------------------
    def _options(self, full: bool = True, strict: bool = True) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=full, strict=strict)

    def module_state_dict(self) -> dict[str, Any]:
        """The full (unsharded) model state dict on every rank (collective)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        self.reshard()
        return get_model_state_dict(self.module, options=self._options())

    def load_module_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Load a full state dict (the same on every rank); each rank keeps its shards (collective)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, state_dict, options=self._options(strict=strict))

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimizer state dict, keyed by parameter names (collective)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, optimizer, options=self._options())

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.module, optimizer, state_dict, options=self._options())

    # ---- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, path: str, *, trainer_state: dict[str, Any], rank_state: dict[str, Any],
                        metadata: dict[str, Any], optimizers: list[torch.optim.Optimizer],
                        safe_serialization: bool = True, writer: Any = None,
                        on_committed: Callable[[], None] | None = None) -> None:
        """Collective save. ``"sharded"``: each rank writes its shards of model and optimizer state through
        ``torch.distributed.checkpoint`` (layout ``"dcp"``; written synchronously, DCP is collective).
        ``"full"``: the state is gathered to rank 0, which writes the replicated layout."""
        if self.state_dict_type == "full":
            super().save_checkpoint(path, trainer_state=trainer_state, rank_state=rank_state, metadata=metadata,
                                    optimizers=optimizers, safe_serialization=safe_serialization, writer=writer,
                                    on_committed=on_committed)
            return
        from framework import checkpoint as io

        token = self._new_token()
        states: dict[str, Any] = {io.rank_state_name(self.global_rank): rank_state}
        if self.is_global_zero:
            states[io.TRAINER] = trainer_state
        sharded = {"model": self._get_model_state(full=False),
                   "optimizers": [self._get_optimizer_state(o, full=False) for o in optimizers]}
        self._write_checkpoint(path, token, states, metadata, safe_serialization, None, on_committed,
                               layout="dcp", extra_files=lambda staging: self._write_dcp(staging, sharded))

    def _write_dcp(self, staging: Any, sharded: dict[str, Any]) -> list[Any]:
        import torch.distributed.checkpoint as dcp

        from framework import checkpoint as io
        from framework.checkpoint.consolidate import DCP_DIR
        from framework.checkpoint.storage import locate

        location = locate(staging.dir).join(DCP_DIR)
        if location.is_local:
            dcp.save(sharded, checkpoint_id=location.url)
        else:
            dcp.save(sharded, storage_writer=dcp.FsspecWriter(location.url))
        self.barrier("dcp-written")
        mine = [name for name in location.file_sizes() if _written_by(name, self.global_rank)]
        return io.describe_files(staging, [f"{DCP_DIR}/{name}" for name in sorted(mine)])

    def load_checkpoint(self, path: str, *, optimizers: list[torch.optim.Optimizer] | None,
                        validate: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load a ``"dcp"`` checkpoint into this run's shards (resharding to a different world size), or a
        full one through the base; returns ``(trainer_state, this rank's state)``. ``validate`` sees the
        trainer state before any shard is changed."""
        import torch.distributed.checkpoint as dcp

        from framework import checkpoint as io
        from framework.checkpoint.consolidate import DCP_DIR
        from framework.checkpoint.storage import locate

        manifest = io.read_manifest(path)
        if manifest.layout != "dcp":
            return super().load_checkpoint(path, optimizers=optimizers, validate=validate)
        io.verify_checkpoint(path, manifest)
        shared = io.read_state(path, io.TRAINER, manifest)
        if validate is not None:
            validate(shared, None)
        optimizers = optimizers or []
        sharded = {"model": self._get_model_state(full=False),
                   "optimizers": [self._get_optimizer_state(o, full=False) for o in optimizers]}
        location = locate(path).join(DCP_DIR)
        with _saved_count_check(path, manifest, len(optimizers)):
            if location.is_local:
                dcp.load(sharded, checkpoint_id=location.url)
            else:
                dcp.load(sharded, storage_reader=dcp.FsspecReader(location.url))
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.module, sharded["model"], options=self._options(full=False))
        for optimizer, state in zip(optimizers, sharded["optimizers"]):
            set_optimizer_state_dict(self.module, optimizer, state, options=self._options(full=False))
        return shared, self._read_rank_state(path, manifest)

    def _full_model_and_optimizers(self, optimizers: list[torch.optim.Optimizer]
                                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Gathered to rank 0 on the CPU (collective); other ranks get empty states."""
        return (self._get_model_state(full=True, rank0_only=True),
                [self._get_optimizer_state(o, full=True, rank0_only=True) for o in optimizers])

    def _get_model_state(self, full: bool, rank0_only: bool = False) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.reshard()
        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=full, cpu_offload=rank0_only))

    def _get_optimizer_state(self, optimizer: torch.optim.Optimizer, full: bool, rank0_only: bool = False) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, optimizer,
                                        options=StateDictOptions(full_state_dict=full, cpu_offload=rank0_only))

    def reshard(self) -> None:
        """Free any gathered parameters (e.g. the root's, kept after an evaluation forward)."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def teardown(self) -> None:
        """Leave the model sharded and the group alive: validate/test/predict/save still work afterwards."""
        super().teardown()
        if self.model is not None and self._sync_disabled:
            self.model.set_requires_gradient_sync(True)
            self._sync_disabled = False


def _written_by(name: str, rank: int) -> bool:
    """Whether DCP's file ``name`` was written by ``rank`` (``__{rank}_{i}.distcp``; rank 0 also the metadata)."""
    match = re.fullmatch(r"__(\d+)_\d+\.distcp", name)
    return int(match.group(1)) == rank if match else rank == 0


@contextmanager
def _saved_count_check(path: str, manifest: Any, expected: int) -> Iterator[None]:
    """Turn DCP's missing-key error for a different number of optimizers into a clear ValueError."""
    try:
        yield
    except RuntimeError as exc:
        if "optimizers" in str(exc) and "Missing key" in str(exc):
            raise ValueError(f"The checkpoint {path} does not hold {expected} optimizer state(s) matching "
                             "configure_optimizers(); resume with the same optimizer setup.") from exc
        raise


def _policy_matcher(policy: Any) -> Callable[[nn.Module], bool] | None:
    if policy is None:
        return None
    if isinstance(policy, (set, frozenset, list, tuple)):
        classes = tuple(policy)
        if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
            raise TypeError(f"auto_wrap_policy={policy!r} must hold nn.Module subclasses, e.g. {{nn.TransformerEncoderLayer}}.")
        return lambda module: isinstance(module, classes)
    if callable(policy):
        return policy
    raise TypeError(f"auto_wrap_policy={policy!r} is not valid; pass None, a set of nn.Module classes, or "
                    "callable(module) -> bool.")


def _wrap_targets(root: nn.Module, match: Callable[[nn.Module], bool] | None) -> list[nn.Module]:
    """Submodules to shard as their own groups, children before parents; tied ones stay in the parent."""
    if match is None:
        return []
    names_of: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    targets = []
    for prefix, sub in root.named_modules():
        if sub is root or not match(sub):
            continue
        inside = prefix + "."
        shared = [names_of[id(p)] for p in sub.parameters() if any(not n.startswith(inside) for n in names_of[id(p)])]
        if shared:
            warnings.warn(f"FSDP: not sharding {prefix!r} as its own group: its parameters are shared with "
                          f"modules outside it ({', '.join(shared[0])}); they stay in the parent's group.",
                          stacklevel=3)
            continue
        targets.append(sub)
    return list(reversed(targets))


def _materialize_meta(root: nn.Module, device: torch.device) -> None:
    """Allocate parameters built on the meta device (``configure_model``) and initialise them per shard."""
    if not any(t.is_meta for t in _tensors(root)):
        return
    root.to_empty(device=device)
    for module in root.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()
