"""The checkpoint half of the Strategy: state dicts in the replicated layout, writing a checkpoint directory
(staging, files, manifest committed last, optionally in the background) and reading one back after checking it
against the run. Sharded strategies (FSDP/DCP, DeepSpeed) override the layout-specific parts."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

STRATEGY_STATE = "strategy"  # checkpoint state holding Strategy.strategy_state()


class StrategyCheckpoints:
    """Mixed into Strategy: saving and loading what a checkpoint holds, in this strategy's layout."""

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
        model_state = read_model_state(path, manifest, mapped=True)  # copied into the module below
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
