"""Finding, ranking and removing complete checkpoints in a folder (see :mod:`framework.checkpoint.format`).

A checkpoint counts only once its manifest is committed; these functions skip the rest with a
warning, rank the complete ones newest first, delete a checkpoint so no crash leaves a half-deleted
one visible, and clear what interrupted saves and deletions left behind.
"""

from __future__ import annotations

import os
import re
import stat
import time
import warnings

from framework.checkpoint.format import (
    MANIFEST,
    PENDING_MARK,
    CheckpointError,
    Manifest,
    checkpoint_error,
    new_token,
)
from framework.checkpoint.load import read_manifest
from framework.checkpoint.owner import ABANDONED_MARK, OWNER_PREFIX, owner_gone
from framework.checkpoint.storage import Location, locate, redact

__all__ = ["list_checkpoints", "find_last", "remove_checkpoint", "cleanup_stale"]

_STAGING = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|init)-[A-Za-z0-9_-]{1,64}")


def _check_sizes(path: str, manifest: Manifest) -> None:
    sizes = locate(path).file_sizes()
    for rel, entry in manifest.files.items():
        if sizes.get(rel) != entry["size"]:
            found = "missing" if rel not in sizes else f"{sizes[rel]} bytes"
            raise checkpoint_error(path, f"file {rel} is {found}, the manifest says {entry['size']} bytes")


def list_checkpoints(dirpath: str) -> list[Manifest]:
    """Complete checkpoints directly under ``dirpath``, newest first: by commit time, then global_step.

    Commit time, not step: after resuming an earlier checkpoint into the same folder, the checkpoints
    of the abandoned continuation have higher steps but are not the run's latest state. Hidden entries (staging dirs) and plain files are ignored; directories without a valid
    manifest or with a file of the wrong size are skipped with a warning naming them.
    """
    found = []
    parent = locate(dirpath)
    for child in parent.child_dirs():
        child_path = parent.child_url(child)
        try:
            manifest = read_manifest(child_path)
            _check_sizes(child_path, manifest)
        except CheckpointError as exc:
            warnings.warn(f"skipping damaged or incomplete {exc}", stacklevel=2)
            continue
        found.append(manifest)
    return sorted(found, key=lambda m: (m.created, m.global_step, m.path), reverse=True)


def find_last(dirpath: str) -> str | None:
    """Path of the newest complete checkpoint under ``dirpath``, or None."""
    checkpoints = list_checkpoints(dirpath)
    return checkpoints[0].path if checkpoints else None


def remove_checkpoint(path: str, *, force: bool = False) -> None:
    """Delete a checkpoint so that a crash at any moment leaves either it, complete, or nothing visible.

    A local one is first renamed to a hidden ``.<name>.old-*`` dir (atomic), then its files go; a crash
    mid-delete leaves a hidden dir that :func:`cleanup_stale` removes. On object stores the manifest
    goes first, so a half-deleted checkpoint is never complete. A directory without a manifest is only
    deleted with ``force=True``.
    """
    loc = locate(path)
    manifest = loc.join(MANIFEST)
    if not manifest.exists():
        if not loc.exists():
            raise FileNotFoundError(f"checkpoint {redact(path)} does not exist")
        if not force:
            raise checkpoint_error(path, f"it has no {MANIFEST}, so it may not be a checkpoint; pass force=True to "
                                   "delete it")
    if loc.is_local:
        aside = loc.sibling(f".{loc.name}.old-{new_token()}")
        os.rename(loc.path, aside.path)
        loc = aside
    else:
        manifest.remove_file(missing_ok=True)
    loc.remove_tree()


STALE_AFTER_S = 3600.0
# A ".init-" scratch dir gets its owner record microseconds after it is made (the record is prepared first), so
# one still without a record after this long belongs to a writer that died in between.
INIT_GRACE_S = 2.0
"""Age after which a staging dir whose writer cannot be checked from this machine counts as abandoned."""


def cleanup_stale(dirpath: str, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove what saves and deletions that a crash cut short left under ``dirpath``; never a running save's.

    A staging dir (local ``.<name>.tmp-*``; on object stores a checkpoint dir still carrying the pending
    mark and no manifest) goes when every process that wrote into it ran on this machine and has ended.
    Otherwise (a writer on another host or container, or no owner record) it goes only once nothing in it
    changed for ``max_age_s`` seconds (default :data:`STALE_AFTER_S`, one hour): pass the longest a save
    can take on shared or remote storage. Hidden ``.<name>.old-*`` dirs (checkpoints whose deletion was
    decided) always go; two processes deleting one is harmless.
    """
    parent = locate(dirpath)
    stale = []
    if parent.is_local:
        for name, mtime in parent.hidden_dirs():
            match = _STAGING.fullmatch(name)
            if match and (match["kind"] == "old" or _abandoned(parent.join(name), mtime, max_age_s,
                                                                 scratch=match["kind"] == "init")):
                stale.append(parent.join(name))
    else:
        for loc in (parent.join(name) for name in parent.child_dirs()):
            if loc.join(PENDING_MARK).exists() and not loc.join(MANIFEST).exists() and _abandoned(
                    loc, time.time() - _age_s(loc.join(PENDING_MARK)), max_age_s):
                stale.append(loc)
    for loc in stale:
        loc.remove_tree()
    return [loc.url for loc in stale]


def _abandoned(loc: Location, mtime: float, max_age_s: float, scratch: bool = False) -> bool:
    if loc.join(ABANDONED_MARK).exists():
        return True
    verdicts, newest = [], mtime
    for data, modified in _owner_records(loc):
        if not data and time.time() - modified > INIT_GRACE_S:
            verdicts.append(True)  # a record its writer died writing (left by Kiln before records were renamed in)
            continue
        verdicts.append(owner_gone(data))
        newest = max(newest, modified)
    if scratch and not verdicts:
        return time.time() - mtime > INIT_GRACE_S
    if verdicts and all(v is True for v in verdicts):
        return True
    if False in verdicts:
        return False  # a writer is running
    return time.time() - newest > max_age_s


def _owner_records(loc: Location) -> list[tuple[bytes, float]]:
    """(content, mtime) of the owner records directly inside ``loc``."""
    found = []
    try:
        if loc.is_local:
            with os.scandir(loc.path) as it:
                entries = [(e.name, e.stat(follow_symlinks=False)) for e in it if e.name.startswith(OWNER_PREFIX)]
            for name, st in entries:
                if stat.S_ISREG(st.st_mode) and st.st_size < 4096:
                    found.append((loc.join(name).read_bytes(), st.st_mtime))
        else:
            for info in loc.fs.ls(loc.path, detail=True):
                name = info["name"].rstrip("/").rsplit("/", 1)[-1]
                if name.startswith(OWNER_PREFIX) and int(info.get("size") or 0) < 4096:
                    found.append((loc.join(name).read_bytes(), time.time() - _age_s(loc.join(name))))
    except OSError:
        pass
    return found


def _age_s(loc: Location) -> float:
    """Seconds since ``loc`` (a remote file) was modified; infinite when the filesystem cannot tell."""
    try:
        modified = loc.fs.modified(loc.path)
    except (NotImplementedError, AttributeError, OSError, ValueError):
        return float("inf")
    return time.time() - modified.timestamp()
