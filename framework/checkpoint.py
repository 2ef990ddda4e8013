"""Checkpoint directories: atomic multi-rank commit and verified loading.

Discovery and removal (``list_checkpoints``, ``find_last``, ``remove_checkpoint``, ``cleanup_stale``)
live in :mod:`framework.checkpoint_discovery` and are re-exported here.

A checkpoint is one directory of state files plus a ``manifest.json`` written last that lists
every file with its size and checksum; a directory without a valid manifest is not a checkpoint.
Local checkpoints are written into a hidden staging dir ``.<name>.tmp-<token>`` beside the target
and renamed into place; fsspec URLs are written in place, manifest last (one atomic PUT).

Layout the Trainer writes (states are named, one name = one or two files)::

    model.safetensors + model.json      module state dict (rank 0)        [or model.pt]
    trainer.safetensors + trainer.json  optimizers, schedulers, loop, callbacks (rank 0)
    rank-{r}.safetensors + rank-{r}.json  per-rank RNG and data position
    manifest.json                       written last by rank 0

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
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from framework import tensor_files
from framework.checkpoint_async import AsyncCheckpointWriter
from framework.checkpoint_storage import Location, locate, redact
from framework.serialization import flatten_state, skeleton_from_json, skeleton_to_json, unflatten_state

__all__ = [
    "CheckpointError", "CheckpointDamaged", "FileEntry", "Manifest", "Staging", "MODEL", "TRAINER", "MANIFEST", "redact",
    "rank_state_name", "new_token", "begin_checkpoint", "write_state", "describe_files",
    "commit_checkpoint", "save_checkpoint", "read_manifest", "read_state", "verify_checkpoint",
    "list_checkpoints", "find_last", "remove_checkpoint", "cleanup_stale", "AsyncCheckpointWriter",
    "exchange_entries",
]

FORMAT = "kiln-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model"
TRAINER = "trainer"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}")
_SIDECAR = ".entries-rank-{rank}.json"
_PENDING = ".kiln-pending"  # in a remote checkpoint being written (no atomic rename there): cleanup_stale's mark


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or unsafe; the message names it and the file."""


class CheckpointDamaged(CheckpointError):
    """A file of the checkpoint is missing or differs from what its manifest recorded (size, checksum):
    storage damage, as opposed to an intact checkpoint that cannot or must not be loaded (e.g. a pickle
    holding code, which only someone with write access can have put there). ``ckpt_path="last"`` skips
    damaged checkpoints and stops at the others."""


class FileEntry(TypedDict):
    path: str  # relative to the checkpoint dir, "/"-separated
    size: int
    checksum: str  # "<algorithm>:<hex>"


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``."""

    path: str
    format_version: int
    world_size: int
    strategy: str
    layout: str
    created: float
    metadata: dict[str, Any]
    files: dict[str, FileEntry]

    @property
    def global_step(self) -> int:
        step = self.metadata.get("global_step")
        return step if type(step) is int else -1

    def state_names(self) -> list[str]:
        """Names of the states stored in this checkpoint (``model``, ``trainer``, ``rank-0``...)."""
        suffixes = (".safetensors", ".pt")
        return sorted({p.rsplit(".", 1)[0] for p in self.files if p.endswith(suffixes) and "/" not in p})


@dataclass(frozen=True)
class Staging:
    """Where a checkpoint is being written: ``dir`` (staging dir, or the target for URLs)."""

    target: str
    dir: str
    token: str


def rank_state_name(rank: int) -> str:
    return f"rank-{int(rank)}"


def new_token() -> str:
    """A fresh staging token; rank 0 makes one and broadcasts it so all ranks share a staging dir."""
    return uuid.uuid4().hex


def checkpoint_error(path: str, msg: str, *, damaged: bool = False) -> CheckpointError:
    """CheckpointError (CheckpointDamaged with ``damaged=True``) naming the (redacted) checkpoint."""
    return (CheckpointDamaged if damaged else CheckpointError)(f"checkpoint {redact(path)}: {msg}")


def _safe_relpath(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return False
    if re.match(r"[A-Za-z]:", rel):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


# ----------------------------------------------------------------------------- writing


def begin_checkpoint(path: str, token: str | None = None) -> Staging:
    """Prepare to write checkpoint ``path`` (local path or fsspec URL); idempotent across ranks.

    Ranks passing the same ``token`` share one staging dir. For URLs an existing manifest at
    ``path`` is removed first, so an overwritten checkpoint is never mistaken for complete, and a
    pending mark is written that lets :func:`cleanup_stale` remove the files of a save that never
    committed.
    """
    token = new_token() if token is None else token
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ValueError(f"token={token!r} is invalid: use 1-64 characters from [A-Za-z0-9_-] (see new_token())")
    loc = locate(path)
    if not loc.name or loc.name.startswith("."):
        raise ValueError(f"path={redact(path)!r} needs a final component that does not start with '.'")
    if loc.is_local:
        staging = loc.sibling(f".{loc.name}.tmp-{token}")
        staging.makedirs()
        return Staging(target=path, dir=staging.url, token=token)
    loc.makedirs()
    loc.join(MANIFEST).remove_file(missing_ok=True)
    write_file(loc.join(_PENDING), lambda f, h: f.write(b""))
    return Staging(target=path, dir=path, token=token)


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
    if not isinstance(name, str) or not _STATE_NAME.fullmatch(name) or name == MANIFEST.split(".")[0]:
        raise ValueError(f"name={name!r} is invalid: use letters, digits and _.=- (not 'manifest')")
    tensors, skeleton = flatten_state(tree)
    root = locate(staging.dir)
    if not safe_serialization:
        size, digest = write_file(root.join(f"{name}.pt"),
                                   lambda f, h: tensor_files.write_pt(f, tensors, skeleton, h), fsync)
        return [FileEntry(path=f"{name}.pt", size=size, checksum=digest)]
    skeleton_bytes = skeleton_to_json(skeleton)

    def write_skeleton(f: Any, hasher: tensor_files.StreamHasher) -> int:
        f.write(skeleton_bytes)
        hasher.update(skeleton_bytes)
        return len(skeleton_bytes)

    size, digest = write_file(root.join(f"{name}.safetensors"),
                               lambda f, h: tensor_files.write_safetensors(f, tensors, h), fsync)
    json_size, json_digest = write_file(root.join(f"{name}.json"), write_skeleton, fsync)
    return [FileEntry(path=f"{name}.safetensors", size=size, checksum=digest),
            FileEntry(path=f"{name}.json", size=json_size, checksum=json_digest)]


def describe_files(staging: Staging, relpaths: Iterable[str]) -> list[FileEntry]:
    """Manifest entries for files written into the staging dir by other means (e.g. DCP shards)."""
    root = locate(staging.dir)
    entries = []
    for rel in relpaths:
        if not _safe_relpath(rel):
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
    sidecar = root.join(_SIDECAR.format(rank=rank))
    if root.is_local:
        partial = root.join(_SIDECAR.format(rank=rank) + ".partial")
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
                merged += json.loads(root.join(_SIDECAR.format(rank=r)).read_bytes())
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise checkpoint_error(staging.target, f"rank {r} did not hand over its files within "
                                                           f"{timeout_s:.0f}s (did it fail or crash?)") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
    return merged


def _jsonable(metadata: Mapping[str, Any]) -> dict[str, Any]:
    def convert(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
        if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
            return value.item()
        if isinstance(value, Mapping):
            return {str(k): convert(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"metadata[{key!r}] is a {type(value).__qualname__}; metadata must be JSON-able "
                        "(numbers, strings, lists, dicts)")

    return {str(k): convert(v, str(k)) for k, v in metadata.items()}


def _manifest_checksum(doc: Mapping[str, Any], algorithm: str) -> str:
    hasher = tensor_files.StreamHasher(algorithm)
    hasher.update(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    return hasher.hexdigest()


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
        if not _safe_relpath(e["path"]) or e["path"] == MANIFEST or e["path"] in seen:
            raise ValueError(f"entries contain an invalid or duplicate path {e['path']!r}")
        seen.add(e["path"])
    root = locate(staging.dir)
    sizes = root.file_sizes()
    for e in entries:
        if sizes.get(e["path"]) != e["size"]:
            found = sizes.get(e["path"], "missing")
            raise checkpoint_error(staging.target, f"file {e['path']} in the staging dir is {found} bytes, but its "
                                                   f"entry says {e['size']} (did every rank finish writing?)")
    for rel in set(sizes) - seen - {_PENDING}:
        root.join(rel).remove_file(missing_ok=True)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.time(),
           "world_size": int(world_size), "strategy": str(strategy), "layout": str(layout),
           "metadata": _jsonable(metadata or {}), "files": sorted(entries, key=lambda e: e["path"])}
    doc["checksum"] = _manifest_checksum(doc, tensor_files.default_algorithm())
    data = json.dumps(doc, indent=1).encode()
    write_file(root.join(MANIFEST), lambda f, h: f.write(data), fsync)
    if root.is_local:
        locate(staging.target).replace_with(root, staging.token, fsync=fsync)
    else:
        root.join(_PENDING).remove_file(missing_ok=True)  # after the manifest: complete either way
    return staging.target


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


# ----------------------------------------------------------------------------- reading


def _parse_manifest(path: str, data: bytes) -> Manifest:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("it is not a Kiln manifest")
        if not isinstance(doc.get("format_version"), int) or doc["format_version"] > FORMAT_VERSION:
            raise ValueError(f"format_version {doc.get('format_version')!r} is newer than this Kiln "
                             f"({FORMAT_VERSION}); upgrade Kiln to load it")
        checksum = doc.pop("checksum", None)
        if not isinstance(checksum, str) or _manifest_checksum(doc, tensor_files.split_checksum(checksum)) != checksum:
            raise ValueError("its checksum does not match its content")
        files: dict[str, FileEntry] = {}
        for e in doc["files"]:
            if not _safe_relpath(e.get("path")) or e["path"] == MANIFEST or e["path"] in files:
                raise ValueError(f"file path {e.get('path')!r} is unsafe or repeated (must stay inside the checkpoint)")
            if type(e.get("size")) is not int or e["size"] < 0 or not isinstance(e.get("checksum"), str):
                raise ValueError(f"entry {e!r} lacks a valid size or checksum")
            tensor_files.split_checksum(e["checksum"])
            files[e["path"]] = FileEntry(path=e["path"], size=e["size"], checksum=e["checksum"])
        manifest = Manifest(path=path, format_version=doc["format_version"], world_size=int(doc["world_size"]),
                            strategy=str(doc["strategy"]), layout=str(doc["layout"]), created=float(doc["created"]),
                            metadata=dict(doc["metadata"]), files=files)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise checkpoint_error(path, f"{MANIFEST} is invalid: {type(exc).__name__}: {exc}"[:2000]) from None
    return manifest


def read_manifest(path: str) -> Manifest:
    """Read and validate ``<path>/manifest.json``; CheckpointError if absent or invalid."""
    loc = locate(path)
    try:
        data = loc.join(MANIFEST).read_bytes()
    except FileNotFoundError:
        reason = "it does not exist" if not loc.exists() else f"it has no {MANIFEST} (incomplete or not a checkpoint)"
        raise checkpoint_error(path, reason) from None
    except (IsADirectoryError, NotADirectoryError):
        raise checkpoint_error(path, f"its {MANIFEST} is not a file (or the checkpoint is not a directory)",
                               damaged=True) from None
    return _parse_manifest(path, data)


class NoHash:
    """Stand-in hasher for unverified reads."""

    algorithm = "none"

    def update(self, data: Any) -> None:
        pass


def _read_file(path: str, manifest: Manifest, rel: str, reader: Any, verify: bool) -> Any:
    entry = manifest.files[rel]
    root = locate(path)
    loc = root.join(rel)
    if loc.is_local and not _inside(root.path, loc.path):
        raise checkpoint_error(path, f"file {rel} resolves to a place outside the checkpoint directory (a symbolic "
                                     "link?); refusing to read it")
    try:
        with loc.open("rb") as f:
            size = loc.size_of_open(f)
            if size != entry["size"]:
                raise checkpoint_error(path, f"file {rel} is damaged: it has {size} bytes, the manifest says "
                                             f"{entry['size']} (truncated or overwritten)", damaged=True)
            hasher = tensor_files.StreamHasher(tensor_files.split_checksum(entry["checksum"])) if verify else NoHash()
            result = reader(f, size, hasher)
    except FileNotFoundError:
        raise checkpoint_error(path, f"file {rel} listed in the manifest is missing", damaged=True) from None
    except (IsADirectoryError, NotADirectoryError):
        raise checkpoint_error(path, f"file {rel} listed in the manifest is not a file", damaged=True) from None
    except (ValueError, RecursionError) as exc:  # parsed before its checksum was complete: damaged unless intact
        raise checkpoint_error(path, f"file {rel} is damaged or unreadable: {type(exc).__name__}: {exc}"[:2000],
                               damaged=not _intact(loc, entry)) from None
    if verify and hasher.hexdigest() != entry["checksum"]:
        raise checkpoint_error(path, f"file {rel} is damaged: its checksum does not match the manifest",
                               damaged=True)
    return result


def _inside(root: str, path: str) -> bool:
    """Whether local ``path``, symbolic links resolved, lies inside directory ``root`` (itself resolved)."""
    real_root = os.path.realpath(root)
    return os.path.realpath(path).startswith(real_root.rstrip(os.sep) + os.sep)


def _intact(loc: Location, entry: FileEntry) -> bool:
    """Whether the file's bytes are what the manifest recorded (reads it once more: error paths only)."""
    hasher, size = tensor_files.StreamHasher(tensor_files.split_checksum(entry["checksum"])), 0
    try:
        with loc.open("rb") as f:
            while chunk := f.read(16 * 2**20):
                hasher.update(chunk)
                size += len(chunk)
    except OSError:
        return False
    return size == entry["size"] and hasher.hexdigest() == entry["checksum"]


def read_state(path: str, name: str, manifest: Manifest | None = None, *, verify: bool = True) -> Any:
    """Load state ``name`` (saved in either format) as CPU tensors; verifies size and checksum."""
    manifest = manifest if manifest is not None else read_manifest(path)
    if f"{name}.safetensors" in manifest.files:
        if f"{name}.json" not in manifest.files:
            raise checkpoint_error(path, f"state {name!r} has no {name}.json skeleton")
        skeleton = _read_file(path, manifest, f"{name}.json",
                              lambda f, size, h: _read_json_skeleton(f, size, h), verify)
        tensors = _read_file(path, manifest, f"{name}.safetensors", tensor_files.read_safetensors, verify)
        try:
            return unflatten_state(skeleton, tensors)
        except ValueError as exc:
            raise checkpoint_error(path, f"file {name}.json does not match {name}.safetensors: {exc}") from None
    if f"{name}.pt" in manifest.files:
        return _read_file(path, manifest, f"{name}.pt", tensor_files.read_pt, verify)
    raise checkpoint_error(path, f"it has no state {name!r}; it holds {manifest.state_names()}")


def _read_json_skeleton(f: Any, size: int, hasher: Any) -> Any:
    data = f.read(size + 1)
    if len(data) != size:
        raise ValueError(f"expected {size} bytes, read {len(data)}")
    hasher.update(data)
    return skeleton_from_json(data)


def verify_checkpoint(path: str, manifest: Manifest | None = None) -> Manifest:
    """Check the size and checksum of every file (e.g. before handing files to another reader)."""
    manifest = manifest if manifest is not None else read_manifest(path)

    def consume(f: Any, size: int, hasher: Any) -> None:
        while chunk := f.read(16 * 2**20):
            hasher.update(chunk)

    for rel in manifest.files:
        _read_file(path, manifest, rel, consume, verify=True)
    return manifest


_DISCOVERY = frozenset({"list_checkpoints", "find_last", "remove_checkpoint", "cleanup_stale"})

if TYPE_CHECKING:
    from framework.checkpoint_discovery import cleanup_stale, find_last, list_checkpoints, remove_checkpoint


def __getattr__(name: str) -> Any:
    # framework.checkpoint_discovery builds on this module, so its names are re-exported on first use.
    if name in _DISCOVERY:
        from framework import checkpoint_discovery

        return getattr(checkpoint_discovery, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
