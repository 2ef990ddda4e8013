"""Who is writing a staging dir: a record each writer leaves in it, and whether that writer provably ended.

``cleanup_stale`` removes the leftovers of saves that a crash cut short, and must never remove the staging
dir of a save that is still running in another process (or on another host sharing the folder). Each
process writing into a staging dir leaves an owner record; a dir is abandoned when every recorded owner
ran on this machine (same hostname, boot and pid namespace) and is gone. Whatever cannot be checked from
here (another host, another container, no record) is judged by age instead (``STALE_AFTER_S``).
"""

from __future__ import annotations

import functools
import json
import os
import socket
from typing import Any

OWNER_PREFIX = ".kiln-owner-"
ABANDONED_MARK = ".kiln-abandoned"  # left by a save that failed in a process that lives on


@functools.cache
def _machine() -> dict[str, str]:
    """Identity of this host, boot and pid namespace (empty strings where the OS does not tell)."""

    def read(path: str, link: bool = False) -> str:
        try:
            if link:
                return os.readlink(path)
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""

    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"),
            "pidns": read("/proc/self/ns/pid", link=True)}


def _start_time(pid: int) -> str:
    """Start time of process ``pid`` in clock ticks since boot ("" when unknown): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_record(pid: int | None = None) -> bytes:
    """The record naming process ``pid`` (default: this one) as a writer."""
    pid = os.getpid() if pid is None else pid
    return json.dumps({**_machine(), "pid": pid, "start": _start_time(pid)}).encode()


def owner_gone(data: bytes) -> bool | None:
    """True when the recorded writer provably ended, False when it runs, None when this machine cannot tell."""
    try:
        record: Any = json.loads(data)
        pid, machine = int(record["pid"]), {k: str(record[k]) for k in ("host", "boot", "pidns")}
    except (ValueError, KeyError, TypeError, OverflowError):
        return None
    here = _machine()
    if machine["host"] != here["host"] or not here["boot"] or any(machine[k] != here[k] for k in ("boot", "pidns")):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        pass
    except OSError:
        return None
    started = _start_time(pid)
    return bool(started and record.get("start") and started != record["start"])  # else: same process, alive
