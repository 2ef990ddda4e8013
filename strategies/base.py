"""The Strategy base: where a model lives, how it is wrapped, and how processes talk.

A Strategy owns the process group, device placement, wrapping (DDP, FSDP, DeepSpeed engine),
collectives, gradient-sync suppression inside accumulation windows, and the checkpoint layout of its
state. Numerics are delegated to the Precision plugin: a Strategy calls ``precision.backward`` and
``precision.optimizer_step`` and never inspects dtypes. The Trainer talks to every strategy through
this interface only, so the loop has no ``isinstance(strategy, ...)`` branches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.precision import Precision
from framework.state import DistributedState

if TYPE_CHECKING:
    from framework.module import TrainModule

_NULL = nullcontext()
STRATEGY_STATE = "strategy"  # checkpoint state holding Strategy.strategy_state()


class Strategy:
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
    def no_sync(self, skip_sync: bool) -> AbstractContextManager:
        """Context for a micro-batch's forward+backward; ``skip_sync`` inside an accumulation window."""
        return _NULL

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

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step one optimizer through the precision plugin; False when the step was skipped."""
        return self.precision.optimizer_step(optimizer)

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

    def save_checkpoint(self, path: str, *, trainer_state: dict[str, Any], rank_state: dict[str, Any],
                        metadata: dict[str, Any], optimizers: list[torch.optim.Optimizer],
                        safe_serialization: bool = True, writer: Any = None,
                        on_committed: Callable[[], None] | None = None) -> None:
        """Collective save in the replicated layout: rank 0 writes model + trainer state, every rank its own.

        With ``writer`` (an AsyncCheckpointWriter) only the snapshot blocks; files are written and the
        manifest committed in the background. ``on_committed`` runs once the checkpoint is complete.
        """
        token = self._new_token()
        states = self._checkpoint_states(trainer_state, rank_state, optimizers)
        self._write_checkpoint(path, token, states, metadata, safe_serialization, writer, on_committed,
                               optimizers=optimizers)

    def _new_token(self) -> str:
        from framework import checkpoint as io

        return self.broadcast(io.new_token() if self.is_global_zero else None)

    def _checkpoint_states(self, trainer_state: dict[str, Any], rank_state: dict[str, Any],
                           optimizers: list[torch.optim.Optimizer] | None) -> dict[str, Any]:
        """The states of the replicated layout: every rank its own, rank 0 the full model and the trainer
        state (with each optimizer's full state unless ``optimizers`` is None: an engine saves them itself).

        Every rank calls ``_full_model_and_optimizers`` (gathering is collective for sharded layouts)."""
        from framework import checkpoint as io

        model, optimizer_states = self._full_model_and_optimizers(optimizers or [])
        states: dict[str, Any] = {io.rank_state_name(self.global_rank): rank_state}
        if self.is_global_zero:
            states[io.MODEL] = model
            states[io.TRAINER] = trainer_state if optimizers is None else {**trainer_state,
                                                                           "optimizers": optimizer_states}
            own = self.strategy_state()
            if own:
                states[STRATEGY_STATE] = own
        return states

    def _full_model_and_optimizers(self, optimizers: list[torch.optim.Optimizer]
                                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Full model and optimizer states, needed on rank 0 only (other ranks may return empty ones)."""
        if not self.is_global_zero:
            return {}, []
        return self.module_state_dict(), [self.optimizer_state_dict(o) for o in optimizers]

    def _write_checkpoint(self, path: str, token: str, states: dict[str, Any], metadata: dict[str, Any],
                          safe_serialization: bool, writer: Any, on_committed: Callable[[], None] | None,
                          layout: str = "full", extra_files: Callable[[Any], list] | None = None,
                          optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
        from framework import checkpoint as io

        commit_kwargs = {"world_size": self.world_size, "strategy": self.name, "layout": layout}

        def write_files() -> tuple[Any, list]:
            staging = None
            try:
                staging = io.begin_checkpoint(path, token)
                entries = [e for name, tree in states.items()
                           for e in io.write_state(staging, name, tree, safe_serialization=safe_serialization)]
                if extra_files is not None:
                    entries += extra_files(staging)
            except BaseException as exc:
                if staging is not None:
                    _discard_staging(staging)  # a failed save leaves no partial files in the checkpoint dir
                _note_failed_save(exc, path)
                raise
            return staging, entries

        def commit(staging: Any, entries: list) -> None:
            try:
                io.commit_checkpoint(staging, entries, metadata, **commit_kwargs)
            except BaseException as exc:  # leftovers are hidden (local) or pending-marked: cleanup_stale's
                _note_failed_save(exc, path)
                raise

        if writer is None:
            staging, entries = write_files()
            gathered = self.all_gather_object(entries)
            if self.is_global_zero:
                commit(staging, [e for rank in gathered for e in rank])
            self.barrier("checkpoint-commit")
            if on_committed is not None:
                on_committed()
            return
        # parameters and optimizer state are copied while the next forward/backward runs; steps wait for it
        states = writer.snapshot(states, module=self.module, optimizers=optimizers)
        rank, world = self.global_rank, self.world_size

        def write_and_commit() -> None:
            staging, entries = write_files()
            if world == 1:
                commit(staging, entries)
            else:  # no collectives off the main thread: ranks hand their entries over through the staging dir
                all_entries = io.exchange_entries(staging, entries, rank=rank, world_size=world)
                if rank == 0:
                    commit(staging, all_entries)
            if on_committed is not None and (rank == 0 or world == 1):
                on_committed()

        writer.submit(write_and_commit)

    def load_checkpoint(self, path: str, *, optimizers: list[torch.optim.Optimizer] | None,
                        validate: Callable[[dict[str, Any], dict[str, Any] | None], None] | None = None
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load model (and optimizer) state in place; return ``(trainer_state, this rank's state)``.

        Everything is read first; ``validate(trainer_state, model_state)`` may refuse it before anything is
        changed, so a failed restore leaves the module and optimizers as they were.
        """
        from framework import checkpoint as io
        from framework.checkpoint.consolidate import read_model_state

        manifest = io.read_manifest(path)
        model_state = read_model_state(path, manifest)
        shared = io.read_state(path, io.TRAINER, manifest)
        saved = shared.get("optimizers", [])
        if optimizers and len(saved) != len(optimizers):
            raise ValueError(f"The checkpoint {io.redact(path)} has {len(saved)} optimizer state(s) but "
                             f"configure_optimizers() returned {len(optimizers)}; resume with the same setup.")
        own = self._read_rank_state(path, manifest)
        strategy_state = (io.read_state(path, STRATEGY_STATE, manifest)
                          if optimizers is not None and STRATEGY_STATE in manifest.state_names() else None)
        if validate is not None:
            validate(shared, model_state)
        self.load_module_state_dict(model_state)
        for optimizer, state in zip(optimizers or [], saved):
            self.load_optimizer_state_dict(optimizer, state)
        if strategy_state is not None:
            self.load_strategy_state(strategy_state)
        return shared, own

    def strategy_state(self) -> dict[str, Any]:
        """The strategy's own resumable state (saved by rank 0 as the checkpoint's ``strategy`` state)."""
        return {}

    def load_strategy_state(self, state: dict[str, Any]) -> None:
        """Restore ``strategy_state()`` when training resumes (every rank gets rank 0's; may be collective)."""

    def _read_rank_state(self, path: str, manifest: Any) -> dict[str, Any]:
        from framework import checkpoint as io

        name = io.rank_state_name(self.global_rank)
        if self.world_size != manifest.world_size and self.is_global_zero:
            warnings.warn(
                f"The checkpoint was saved with world size {manifest.world_size}, this run has {self.world_size}. "
                "The epoch continues with exactly the samples not seen yet at the saved global batch when the "
                "training data is map-style (Kiln's sampler; see framework.reshard); an iterable or custom-batched "
                "loader continues per rank instead. Per-rank random state (dropout, ...) starts anew where a rank "
                "has none saved, so the run is not bit-identical to one that kept its world size.", stacklevel=3)
        if name not in manifest.state_names():
            return {}
        return io.read_state(path, name, manifest)

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


def _note_failed_save(exc: BaseException, path: str) -> None:
    """Say which save failed and that nothing earlier was touched (in the traceback, the type unchanged)."""
    from framework.checkpoint.storage import redact

    if hasattr(exc, "add_note") and isinstance(exc, Exception):
        exc.add_note(f"[kiln] saving checkpoint {redact(path)} failed: it was not committed (a later fit removes "
                     "its partial files); earlier checkpoints are untouched.")


def _discard_staging(staging: Any) -> None:
    """Best-effort removal of a failed save's files (it has no manifest, so it was never a checkpoint)."""
    from framework.checkpoint.storage import locate

    try:
        locate(staging.dir).remove_tree()
    except Exception as exc:  # the write error is the one to report
        warnings.warn(f"could not remove the partial checkpoint files in {staging.dir}: {exc}", stacklevel=3)


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
