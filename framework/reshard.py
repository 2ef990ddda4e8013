"""Resuming on a different number of data-parallel processes: the same samples, the same global batch.

Kiln's samplers (``framework.sampler``) draw one global order per epoch, from the seed and the epoch alone,
and deal it out round-robin: rank ``r`` of ``W`` takes positions ``r, r+W, r+2W, ...``. After every rank
has trained ``b`` batches of ``B`` samples, the epoch has therefore consumed exactly the first ``W·b·B``
samples of that order, whatever ``W`` was. A run resumed on ``W'`` processes continues at batch
``b' = W·b / W'`` of its own epoch, so the rest of the epoch is exactly the samples not seen yet, none
repeated and none skipped (the epoch's end is padded, if at all, as a fresh run on ``W'`` processes pads it).

An optimizer step averages ``W·K`` batches (``K = accumulate_grad_batches``). On ``W'`` processes the same
global batch needs ``K' = W·K / W'``: a Trainer already given ``K'`` is used as is, otherwise ``K`` is
changed to ``K'`` with a warning, and when ``K'`` is not a whole number resuming is refused. Random draws
(dropout, ...) come from per-rank generators, so the resumed run is exact in its data, not bit-exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

_NEW_FIT = ("or start a new fit from the checkpoint's weights (framework.checkpoint.consolidate.load_weights) to "
            "train with another global batch")


@dataclass(frozen=True)
class Resharded:
    """Where a resumed epoch continues on the new number of processes, and the window length to use."""

    batches_done: int
    accumulate_grad_batches: int


def reshard_position(*, epoch: int, batches_done: int, saved_processes: int, processes: int,
                     saved_accumulate: int, accumulate: int, saved_batch_size: int | None,
                     batch_size: int | None) -> Resharded:
    """The batch position and accumulation on ``processes`` equivalent to ``batches_done`` on ``saved_processes``.

    Raises ValueError (naming the numbers and the fix) when the global batch or the position cannot be kept.
    """
    if saved_batch_size != batch_size:
        raise ValueError(f"The checkpoint was saved with {saved_batch_size} samples per batch and process, this run's "
                         f"training loader has batch_size={batch_size}. Resuming on another number of processes keeps "
                         "the per-process batch size; use the saved one.")
    windows = saved_processes * saved_accumulate  # batches per optimizer step, all processes together
    if windows % processes:
        raise ValueError(
            f"Cannot resume a checkpoint saved on {saved_processes} processes with accumulate_grad_batches="
            f"{saved_accumulate} (each optimizer step averages {windows} batches of {batch_size}) on {processes} "
            f"processes: keeping that global batch would need accumulate_grad_batches={windows}/{processes}. Resume "
            f"on a number of processes that divides {windows}, {_NEW_FIT}.")
    kept = windows // processes
    if accumulate != kept:
        warnings.warn(
            f"Resuming a checkpoint saved on {saved_processes} processes on {processes}: accumulate_grad_batches "
            f"changes from {accumulate} to {kept}, so each optimizer step still averages {windows} batches of "
            f"{batch_size} samples as in the saved run. Pass accumulate_grad_batches={kept} to say so.",
            UserWarning, stacklevel=4)
    consumed = saved_processes * batches_done  # batches of the epoch's order already trained, all processes
    if consumed % processes:
        raise ValueError(
            f"The checkpoint was saved after {batches_done} batches of epoch {epoch} on each of {saved_processes} "
            f"processes ({consumed} batches in all), which {processes} processes cannot continue from without "
            f"repeating or skipping samples. Resume from a checkpoint at an optimizer-step boundary, {_NEW_FIT}.")
    return Resharded(consumed // processes, kept)


def reshard_resume(loop_state: dict[str, Any], data_state: dict[str, Any] | None,
                   rank0_data_state: dict[str, Any] | None, *, feed: Any, accumulation: Any,
                   saved_accumulation: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The loop and data state this rank resumes from (``loop_state``/``data_state`` unchanged when the
    number of data-parallel processes is the saved one).

    ``rank0_data_state`` is rank 0's saved data position (every rank gets it, e.g. by a broadcast: ranks that
    did not exist in the saved run have none), ``feed`` this run's training ``DataFeed`` (None: no training
    data yet), ``accumulation`` the Trainer's ``GradientAccumulation`` and ``saved_accumulation`` its state in
    the checkpoint. On a change the accumulation windows are rescaled in place.
    """
    saved = (rank0_data_state or {}).get("num_replicas")
    processes = None if feed is None else feed.num_replicas
    if saved is None or processes is None or saved == processes:
        return loop_state, data_state
    if feed.num_batches is not None and feed.num_batches != len(feed.dataloader):
        raise ValueError(f"limit_train_batches counts batches per process: resuming a checkpoint saved on {saved} "
                         f"processes on {processes} would make the epoch cover other samples. Resume on {saved} "
                         f"processes, or without limit_train_batches, {_NEW_FIT}.")
    epoch = int(loop_state["epoch"])
    schedule = [(int(e), int(k)) for e, k in (saved_accumulation or {}).get("schedule", accumulation.schedule)]
    saved_k = next((k for e, k in reversed(schedule) if e <= epoch), 1)
    position = reshard_position(
        epoch=epoch, batches_done=0 if loop_state["epoch_finished"] else int(loop_state["batches_done"]),
        saved_processes=int(saved), processes=processes, saved_accumulate=saved_k,
        accumulate=accumulation.factor(epoch), saved_batch_size=rank0_data_state.get("batch_size"),
        batch_size=feed.batch_size)
    scale = position.accumulate_grad_batches / saved_k
    if any((k * scale) % 1 for _, k in schedule):
        raise ValueError(f"accumulate_grad_batches={dict(schedule)} cannot be rescaled by {scale:g} for {processes} "
                         f"processes (windows must stay whole); resume on {saved} processes, {_NEW_FIT}.")
    accumulation.schedule = [(e, int(k * scale)) for e, k in schedule]
    loop_state = {**loop_state, "batches_done": position.batches_done}
    data_state = {**rank0_data_state, "batches_consumed": position.batches_done, "num_replicas": processes}
    return loop_state, data_state
