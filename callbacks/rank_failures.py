"""When one rank of a job fails, make the others' errors say so.

A rank that raises leaves the other ranks blocked in a collective; they fail a moment later with a transport
error ("Connection closed by peer", a timeout) that says nothing about the cause. This callback publishes a
failing rank's error in the job's key-value store (the one ``init_process_group`` created) and, on a rank
whose error is such a transport error, adds a note naming the rank that failed first and its error — or,
when no rank reported one, that a peer probably died (killed, out of memory) or hung.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from callbacks.base import Callback

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer

_KEY = "kiln/failure/{rank}"
_PEER_FAILURE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Timed out|timed out|Timeout|"
                           r"NCCL (error|communicator was aborted)|ProcessGroup.*(abort|shut)", re.I)
_WAIT_S = 3.0  # how long a rank with a transport error waits for the failing rank's report
_MAX_CHARS = 2000


class RankFailureReport(Callback):
    """Publishes this rank's error for the others, or explains a transport error with another rank's."""

    def on_exception(self, trainer: Trainer, module: TrainModule, exception: BaseException) -> None:
        if trainer.world_size < 2 or isinstance(exception, (SystemExit, KeyboardInterrupt)):
            return
        store = _store()
        if store is None:
            return
        rank = trainer.global_rank
        try:
            if is_peer_failure(exception):
                note = _explain(store, rank, trainer.world_size)
                if note and hasattr(exception, "add_note"):
                    exception.add_note(note)
            else:
                summary = f"{type(exception).__name__}: {exception}"
                store.set(_KEY.format(rank=rank), summary[:_MAX_CHARS])
        except Exception:  # the store may be gone with rank 0; the original error is the one to raise
            pass


def is_peer_failure(exception: BaseException) -> bool:
    """True for the errors a collective raises when another rank died, hung or closed its connections."""
    import torch.distributed as dist

    return isinstance(exception, dist.DistError) or (isinstance(exception, RuntimeError)
                                                      and bool(_PEER_FAILURE.search(str(exception))))


def _explain(store: Any, rank: int, world_size: int) -> str:
    others = [r for r in range(world_size) if r != rank]
    deadline = time.monotonic() + _WAIT_S
    while True:
        reports = [(r, store.get(_KEY.format(rank=r)).decode(errors="replace")) for r in others
                   if store.check([_KEY.format(rank=r)])]
        if reports or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if reports:
        return "\n".join(f"[kiln] rank {rank} failed because rank {r} failed first with: {summary}"
                         for r, summary in reports)
    return (f"[kiln] rank {rank}: no other rank reported a Python error, so a peer process probably died (killed, "
            "e.g. out of memory, or crashed) or hung; see the launcher's log for its exit status.")


def _store() -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # private API: without it, errors are simply not annotated
        return None
