"""Elastic restarts: a fresh rendezvous namespace per restart round, and ``Trainer(resume="auto")``.

torchrun (``--standalone`` or ``--rdzv-backend=c10d``) shares its agent's TCP store with the workers, and that
store outlives a restart: every key the previous round's process groups wrote (each rank's gloo address) is still
there. A restarted rank that reads a peer's key before the peer rewrote it connects to a dead address and fails
with ``Gloo connectFullMesh failed ... Connection refused`` (pytorch#135712, #167288) — in
``init_process_group`` or in any later ``new_group``. :func:`process_group_store` gives each round its own key
prefix. Ranks cannot tell a stale key from a fresh one by reading it, so they agree on the prefix through a
challenge: every rank but 0 posts a fresh random nonce, rank 0 answers each with the round's random id, and only
an answer that echoes a rank's own nonce counts (and only an acknowledgement carrying the new id counts for rank 0).
Restart rounds are counted in the same store, so every rank of every node agrees on whether this is a restart.

:func:`resolve_ckpt_path` is what ``Trainer(resume="auto")`` (the default) does at the start of ``fit``: under a
restart — a torchrun restart round (``TORCHELASTIC_RESTART_COUNT`` > 0, or any later round of the shared store,
including a membership change) or a SLURM requeue (``SLURM_RESTART_COUNT`` > 0) — fit resumes from the newest
complete checkpoint of the run (``"last"``). When there is none yet (the job failed before its first save) it
starts from ``ckpt_path`` as given (usually None: from scratch), and says so.
"""

from __future__ import annotations

import os
import secrets
import time
import warnings
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

RESUME_MODES = ("auto", None)
_KEY = "kiln/elastic/"
_POLL_S = (0.002, 0.05)  # first and longest pause between two looks at the store
_round: int | None = None  # this process's restart round per the shared store (1: first), once known


def uses_shared_store(environ: Mapping[str, str] | None = None) -> bool:
    """True when the workers' ``MASTER_ADDR:MASTER_PORT`` is torchrun's agent store, shared across restarts."""
    env = os.environ if environ is None else environ
    return env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in env


def process_group_store(rank: int, world_size: int, timeout: timedelta) -> Any:
    """A store for ``init_process_group(store=...)`` whose keys are this restart round's alone; None when the
    job's store is not shared across restarts (then ``init_method="env://"`` is right as is). Collective."""
    global _round
    if not uses_shared_store():
        return None
    import torch.distributed as dist

    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                         timeout=timeout)
    round_id, _round = agree_round(base, rank, world_size, timeout.total_seconds())
    return dist.PrefixStore(f"{_KEY}{round_id}/", base)


def agree_round(store: Any, rank: int, world_size: int, timeout_s: float) -> tuple[str, int]:
    """(a random id only this round's ranks share, the round's number from 1), agreed through ``store``.

    Stale keys of earlier rounds may be present; every value a rank accepts embeds a nonce it drew itself.
    """
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        number = int(store.add(_KEY + "rounds", 1))
        round_id = f"{number}-{secrets.token_hex(8)}"
        pending = set(range(1, world_size))
        answered: dict[int, bytes] = {}
        pause = _POLL_S[0]
        while pending:
            for peer in sorted(pending):
                if store.check([f"{_KEY}ack/{peer}"]) and store.get(f"{_KEY}ack/{peer}").decode() == round_id:
                    pending.discard(peer)
                elif store.check([f"{_KEY}ask/{peer}"]):
                    nonce = store.get(f"{_KEY}ask/{peer}")
                    if answered.get(peer) != nonce:  # a new (or first seen) challenge: answer it
                        store.set(f"{_KEY}answer/{peer}", nonce + b"/" + round_id.encode())
                        answered[peer] = nonce
            if pending:
                _wait(deadline, pending, pause)
                pause = min(pause * 2, _POLL_S[1])
        return round_id, number
    nonce = secrets.token_hex(16).encode()
    store.set(f"{_KEY}ask/{rank}", nonce)
    pause = _POLL_S[0]
    while True:
        if store.check([f"{_KEY}answer/{rank}"]):
            mine, _, round_id = store.get(f"{_KEY}answer/{rank}").partition(b"/")
            if mine == nonce:
                store.set(f"{_KEY}ack/{rank}", round_id)
                return round_id.decode(), int(round_id.split(b"-")[0])
        _wait(deadline, [0], pause)
        pause = min(pause * 2, _POLL_S[1])


def _wait(deadline: float, waiting_for: Any, pause: float) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"[kiln] elastic restart: ranks {sorted(waiting_for)} did not join this restart round's "
                           "rendezvous within the process-group timeout; check that every rank started.")
    time.sleep(pause)


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times this job has been restarted, as this process knows it (0: the first attempt)."""
    env = os.environ if environ is None else environ
    counts = [_int(env.get(name)) for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")]
    if _round is not None and environ is None:
        counts.append(_round - 1)
    return max(counts)


def _int(value: str | None) -> int:
    try:
        return max(0, int(value)) if value else 0
    except ValueError:
        return 0


def check_resume(resume: Any) -> Any:
    """Validate ``Trainer(resume=...)``."""
    if resume not in RESUME_MODES or isinstance(resume, bool):
        raise ValueError(f"resume={resume!r} is not valid; use 'auto' (default: after a torchrun restart or a SLURM "
                         "requeue, fit resumes from the newest checkpoint) or None (fit uses ckpt_path as given).")
    return resume


def resolve_ckpt_path(ckpt_path: Any, resume: Any, checkpoint_dirpath: str | None, *, rank: int = 0,
                      broadcast: Callable[[Any], Any] | None = None) -> Any:
    """The ``ckpt_path`` that ``fit`` should use: ``"last"`` under a restart when a checkpoint exists, else
    ``ckpt_path`` as given. Call it on every rank once the process group exists, with this process's global
    ``rank`` and the strategy's ``broadcast``: rank 0's view of the restart and of the checkpoint folder is then
    everyone's (nodes may disagree on their restart counts, and without a shared file system on the folder)."""
    check_resume(resume)
    if resume is None or ckpt_path == "last":
        return ckpt_path
    decision = _decide(ckpt_path, checkpoint_dirpath) if broadcast is None or rank == 0 else None
    if broadcast is not None:
        decision = broadcast(decision)
    use_last, note = decision
    if note and rank == 0:
        warnings.warn(note, stacklevel=3)
    return "last" if use_last else ckpt_path


def _decide(ckpt_path: Any, dirpath: str | None) -> tuple[bool, str | None]:
    restarts = restart_count()
    if restarts == 0:
        return False, None
    start = f"from ckpt_path={ckpt_path!r}" if ckpt_path is not None else "from scratch"
    if not dirpath:
        return False, (f"resume='auto': restart {restarts} of this job, but checkpointing is off, so training starts "
                       f"{start} again. Enable a ModelCheckpoint to resume after restarts.")
    from framework.checkpoint import find_last, redact

    last = find_last(dirpath)
    if last is None:
        return False, (f"resume='auto': restart {restarts} of this job, but {redact(dirpath)} holds no complete "
                       f"checkpoint yet, so training starts {start}.")
    if ckpt_path is not None:
        return True, (f"resume='auto': restart {restarts} of this job resumes from the newest checkpoint "
                      f"{redact(last)} instead of ckpt_path={ckpt_path!r} (which the first attempt started from); "
                      "pass Trainer(resume=None) to always use ckpt_path.")
    return True, None
