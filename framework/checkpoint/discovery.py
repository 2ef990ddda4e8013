"""Finding, ranking and removing complete checkpoints in a folder (see :mod:`framework.checkpoint.format`).

A checkpoint counts only once its manifest is committed; these functions skip the rest with a
warning, rank the complete ones newest first, delete a checkpoint so no crash leaves a half-deleted
one visible, and clear what interrupted saves and deletions left behind.
"""

from __future__ import annotations

import os
import re
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
from framework.checkpoint.storage import Location, locate, redact

__all__ = ["list_checkpoints", "find_last", "remove_checkpoint", "cleanup_stale"]

_STAGING = re.compile(r"\.(?P<name>.+)\.(tmp|old)-[A-Za-z0-9_-]{1,64}")


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


def cleanup_stale(dirpath: str, max_age_s: float = 3600.0) -> list[str]:
    """Remove what unfinished saves and deletions left under ``dirpath`` longer than ``max_age_s`` ago.

    Locally: staging dirs (``.<name>.tmp-*``/``.old-*``). On object stores: checkpoint dirs that still
    carry the pending mark of :func:`begin_checkpoint` and have no manifest. Call it when no save is
    running (e.g. when fit starts, with ``max_age_s=0``).
    """
    parent = locate(dirpath)
    removed = []
    if parent.is_local:
        stale = [parent.join(name) for name, mtime in parent.hidden_dirs()
                 if _STAGING.fullmatch(name) and time.time() - mtime > max_age_s]
    else:
        stale = [loc for loc in (parent.join(name) for name in parent.child_dirs())
                 if loc.join(PENDING_MARK).exists() and not loc.join(MANIFEST).exists()
                 and (max_age_s <= 0 or _age_s(loc.join(PENDING_MARK)) > max_age_s)]
    for loc in stale:
        loc.remove_tree()
        removed.append(loc.url)
    return removed


def _age_s(loc: Location) -> float:
    """Seconds since ``loc`` (a remote file) was modified; infinite when the filesystem cannot tell."""
    try:
        modified = loc.fs.modified(loc.path)
    except (NotImplementedError, AttributeError, OSError, ValueError):
        return float("inf")
    return time.time() - modified.timestamp()
