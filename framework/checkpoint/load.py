"""Reading a checkpoint: the manifest, then state files verified against it (size, checksum)."""

from __future__ import annotations

import os
from typing import Any

import framework.checkpoint.tensor_files as tensor_files
from framework.checkpoint.format import (
    MANIFEST,
    FileEntry,
    Manifest,
    checkpoint_error,
    parse_manifest,
)
from framework.checkpoint.serialization import skeleton_from_json, unflatten_state
from framework.checkpoint.storage import Location, locate

__all__ = ["read_manifest", "read_state", "verify_checkpoint", "NoHash"]


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
    return parse_manifest(path, data)


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
