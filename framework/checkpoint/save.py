"""Writing a checkpoint: staging, state files, the manifest written last, the atomic rename.

Multi-rank save (the Strategy supplies the collectives)::

    token = broadcast(new_token())                  # same staging dir on every rank
    staging = begin_checkpoint(path, token)
    entries = write_state(staging, rank_state_name(rank), rank_state)
    if rank == 0: entries += write_state(staging, MODEL, model_sd) + write_state(staging, TRAINER, ...)
    all_entries = gather(entries)                   # plain JSON-able dicts
    if rank == 0: commit_checkpoint(staging, all_entries, {"epoch": e, "global_step": s}, world_size=w)
    barrier()
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import framework.checkpoint.pt_files as pt_files
import framework.checkpoint.tensor_files as tensor_files
from framework.checkpoint.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PENDING_MARK,
    SIDECAR,
    STATE_NAME_RE,
    TOKEN_RE,
    FileEntry,
    Staging,
    checkpoint_error,
    jsonable,
    manifest_checksum,
    new_token,
    safe_relpath,
)
from framework.checkpoint.owner import ABANDONED_MARK, OWNER_PREFIX, owner_record
from framework.checkpoint.serialization import flatten_state, skeleton_to_json
from framework.checkpoint.storage import Location, locate, redact

__all__ = ["begin_checkpoint", "write_file", "write_state", "describe_files", "exchange_entries",
           "commit_checkpoint", "save_checkpoint"]


def begin_checkpoint(path: str, token: str | None = None) -> Staging:
    """Prepare to write checkpoint ``path`` (local path or fsspec URL); idempotent across ranks.

    Ranks passing the same ``token`` share one staging dir. For URLs an existing manifest at
    ``path`` is removed first, so an overwritten checkpoint is never mistaken for complete, and a
    pending mark is written that lets :func:`cleanup_stale` remove the files of a save that never
    committed.
    """
    token = new_token() if token is None else token
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        raise ValueError(f"token={token!r} is invalid: use 1-64 characters from [A-Za-z0-9_-] (see new_token())")
    loc = locate(path)
    if not loc.name or loc.name.startswith("."):
        raise ValueError(f"path={redact(path)!r} needs a final component that does not start with '.'")
    if loc.is_local:
        staging = loc.sibling(f".{loc.name}.tmp-{token}")
        if not os.path.isdir(staging.path):
            _create_owned(staging, loc.sibling(f".{loc.name}.init-{new_token()}"))
        else:  # another rank of this save made it
            _write_owner(staging)
        return Staging(target=path, dir=staging.url, token=token)
    loc.makedirs()
    loc.join(MANIFEST).remove_file(missing_ok=True)
    _write_owner(loc)
    write_file(loc.join(PENDING_MARK), lambda f, h: f.write(b""))
    return Staging(target=path, dir=path, token=token)


def _write_owner(staging: Location, record: bytes | None = None) -> None:
    """Leave this process's owner record in a staging dir (commit deletes it with the other unlisted files).

    Locally it is written under another name and renamed into place, so that a writer killed mid-write never
    leaves an empty record (which no cleanup could judge for an hour); an object store's PUT is whole anyway."""
    record = owner_record() if record is None else record
    name = OWNER_PREFIX + new_token()
    if not staging.is_local:
        with staging.join(name).open("wb") as f:
            f.write(record)
        return
    partial = os.path.join(staging.path, ".kiln-partial-" + new_token())
    with open(partial, "wb") as f:
        f.write(record)
    os.rename(partial, os.path.join(staging.path, name))


def _create_owned(staging: Location, scratch: Location) -> None:
    """Create the local staging dir with this process's owner record already inside it: built under a
    name cleanup never takes for a staging dir, then renamed, so no cleanup can see it without an owner."""
    os.makedirs(os.path.dirname(scratch.path), exist_ok=True)
    record = owner_record()  # prepared first: the dir is without it only between two system calls
    os.mkdir(scratch.path)
    _write_owner(scratch, record)
    try:
        os.rename(scratch.path, staging.path)
    except OSError:  # another rank renamed its own first: join that one
        scratch.remove_tree()
        _write_owner(staging)


def write_file(loc: Location, write: Any, fsync: bool = False) -> tuple[int, str]:
    """Write one file via ``write(f, hasher) -> size``; returns (size, checksum)."""
    hasher = tensor_files.StreamHasher()
    with loc.open("wb") as f:
        size = write(f, hasher)
        if fsync and loc.is_local:
            f.flush()
            os.fsync(f.fileno())
    return size, hasher.hexdigest()


def write_state(staging: Staging, name: str, tree: Any, *, safe_serialization: bool = True,
                fsync: bool = False) -> list[FileEntry]:
    """Write state ``name`` into the staging dir; returns its manifest entries (send them to rank 0).

    ``safe_serialization=True`` writes ``<name>.safetensors`` + ``<name>.json``; ``False`` one
    ``<name>.pt``. Raises TypeError naming the key path of an unsupported object.
    """
    if not isinstance(name, str) or not STATE_NAME_RE.fullmatch(name) or name == MANIFEST.split(".")[0]:
        raise ValueError(f"name={name!r} is invalid: use letters, digits and _.=- (not 'manifest')")
    tensors, skeleton = flatten_state(tree)
    root = locate(staging.dir)
    if not safe_serialization:
        size, digest = write_file(root.join(f"{name}.pt"),
                                   lambda f, h: pt_files.write_pt(f, tensors, skeleton, h), fsync)
        return [FileEntry(path=f"{name}.pt", size=size, checksum=digest)]
    skeleton_bytes = skeleton_to_json(skeleton)

    def write_skeleton(f: Any, hasher: tensor_files.StreamHasher) -> int:
        f.write(skeleton_bytes)
        hasher.update(skeleton_bytes)
        return len(skeleton_bytes)

    size, digest = tensor_files.write_safetensors(root.join(f"{name}.safetensors"), tensors, fsync=fsync)
    json_size, json_digest = write_file(root.join(f"{name}.json"), write_skeleton, fsync)
    return [FileEntry(path=f"{name}.safetensors", size=size, checksum=digest),
            FileEntry(path=f"{name}.json", size=json_size, checksum=json_digest)]


def describe_files(staging: Staging, relpaths: Iterable[str]) -> list[FileEntry]:
    """Manifest entries for files written into the staging dir by other means (e.g. DCP shards)."""
    root = locate(staging.dir)
    entries = []
    for rel in relpaths:
        if not safe_relpath(rel):
            raise ValueError(f"relpath={rel!r} must be a relative '/'-separated path inside the checkpoint")
        hasher = tensor_files.StreamHasher()
        with root.join(rel).open("rb") as f:
            size = 0
            while chunk := f.read(16 * 2**20):
                hasher.update(chunk)
                size += len(chunk)
        entries.append(FileEntry(path=rel, size=size, checksum=hasher.hexdigest()))
    return entries


def exchange_entries(staging: Staging, entries: list[FileEntry], *, rank: int, world_size: int,
                     timeout_s: float = 600.0) -> list[FileEntry] | None:
    """Hand every rank's entries to rank 0 through the staging dir, without collectives.

    For writes on a background thread, where a collective would race the training loop's. Each
    rank publishes ``entries`` as a sidecar file (written atomically); rank 0 waits up to
    ``timeout_s`` for all ranks and returns the merged list, other ranks return None. The sidecars
    are not listed in the manifest, so ``commit_checkpoint`` deletes them.
    """
    root = locate(staging.dir)
    data = json.dumps(list(entries)).encode()
    sidecar = root.join(SIDECAR.format(rank=rank))
    if root.is_local:
        partial = root.join(SIDECAR.format(rank=rank) + ".partial")
        write_file(partial, lambda f, h: f.write(data))
        os.replace(partial.path, sidecar.path)
    else:
        write_file(sidecar, lambda f, h: f.write(data))  # a single PUT is atomic
    if rank != 0:
        return None
    merged: list[FileEntry] = []
    deadline, delay = time.monotonic() + timeout_s, 0.01
    for r in range(world_size):
        while True:
            try:
                merged += json.loads(root.join(SIDECAR.format(rank=r)).read_bytes())
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise checkpoint_error(staging.target, f"rank {r} did not hand over its files within "
                                                           f"{timeout_s:.0f}s (did it fail or crash?)") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
    return merged


def commit_checkpoint(staging: Staging, entries: Iterable[Mapping[str, Any]],
                      metadata: Mapping[str, Any] | None = None, *, world_size: int = 1,
                      strategy: str = "single_device", layout: str = "full", fsync: bool = False) -> str:
    """Rank 0: check the files, write the manifest last and (locally) rename into place.

    ``entries`` are the FileEntries of all ranks. Files in the staging dir that no entry lists
    are deleted. An existing checkpoint at the target is replaced. Returns the target path.
    """
    entries = [FileEntry(path=e["path"], size=int(e["size"]), checksum=str(e["checksum"])) for e in entries]
    seen = set()
    for e in entries:
        if not safe_relpath(e["path"]) or e["path"] == MANIFEST or e["path"] in seen:
            raise ValueError(f"entries contain an invalid or duplicate path {e['path']!r}")
        seen.add(e["path"])
    root = locate(staging.dir)
    try:
        _commit(staging, root, entries, seen, metadata, world_size, strategy, layout, fsync)
    except BaseException:
        _mark_abandoned(root)  # this save is over: cleanup_stale may remove its leftovers at once
        raise
    return staging.target


def _commit(staging: Staging, root: Location, entries: list[FileEntry], seen: set[str], metadata: Any,
            world_size: int, strategy: str, layout: str, fsync: bool) -> None:
    sizes = root.file_sizes()
    for e in entries:
        if sizes.get(e["path"]) != e["size"]:
            found = sizes.get(e["path"], "missing")
            raise checkpoint_error(staging.target, f"file {e['path']} in the staging dir is {found} bytes, but its "
                                                   f"entry says {e['size']} (did every rank finish writing?)")
    owners = {rel for rel in sizes if rel.startswith(OWNER_PREFIX)}
    for rel in set(sizes) - seen - owners - {PENDING_MARK}:
        root.join(rel).remove_file(missing_ok=True)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.time(),
           "world_size": int(world_size), "strategy": str(strategy), "layout": str(layout),
           "metadata": jsonable(metadata or {}), "files": sorted(entries, key=lambda e: e["path"])}
    doc["checksum"] = manifest_checksum(doc, tensor_files.default_algorithm())
    data = json.dumps(doc, indent=1).encode()
    write_file(root.join(MANIFEST), lambda f, h: f.write(data), fsync)
    target = locate(staging.target)
    if root.is_local:
        target.replace_with(root, staging.token, fsync=fsync)
    # The writers' records stay until the checkpoint is in place (a staging dir is never left without them);
    # they are not in the manifest, so a crash right here leaves only hidden files nobody reads.
    for rel in owners:
        target.join(rel).remove_file(missing_ok=True)
    if not root.is_local:
        root.join(PENDING_MARK).remove_file(missing_ok=True)  # after the manifest: complete either way


def _mark_abandoned(root: Location) -> None:
    try:
        if root.exists() and (root.is_local or not root.join(MANIFEST).exists()):  # a remote one may be complete
            with root.join(ABANDONED_MARK).open("wb") as f:
                f.write(owner_record())
    except OSError:
        pass  # then the owner records (or age) decide


def save_checkpoint(path: str, states: Mapping[str, Any], metadata: Mapping[str, Any] | None = None, *,
                    safe_serialization: bool = True, world_size: int = 1, strategy: str = "single_device",
                    token: str | None = None, fsync: bool = False) -> str:
    """Single-process save: ``states`` maps state names (``MODEL``, ``TRAINER``, ...) to trees.

    ``fsync=True`` also survives power loss (the atomic rename alone survives a killed process).
    """
    staging = begin_checkpoint(path, token)
    entries: list[FileEntry] = []
    for name, tree in states.items():
        entries += write_state(staging, name, tree, safe_serialization=safe_serialization, fsync=fsync)
    return commit_checkpoint(staging, entries, metadata, world_size=world_size, strategy=strategy, fsync=fsync)
