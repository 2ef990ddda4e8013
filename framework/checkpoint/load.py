"""Reading a checkpoint: the manifest, then state files verified against it (size, checksum)."""

from __future__ import annotations

import os
import stat
from typing import Any

import framework.checkpoint.pt_files as pt_files
import framework.checkpoint.tensor_files as tensor_files
from framework.checkpoint.format import (
    MANIFEST,
    CheckpointError,
    FileEntry,
    Manifest,
    checkpoint_error,
    parse_manifest,
)
from framework.checkpoint.serialization import skeleton_from_json, unflatten_state
from framework.checkpoint.storage import Location, locate, redact

__all__ = ["read_manifest", "read_state", "verify_checkpoint", "NoHash"]


_MAX_MANIFEST = 256 * 2**20
_MAX_RECHECK = 4 * 2**30  # a manifest lists files: far below this even for thousands of shards


def read_manifest(path: str) -> Manifest:
    """Read and validate ``<path>/manifest.json``; CheckpointError if absent or invalid."""
    loc = locate(path)
    _require_directory(path, loc)
    manifest = loc.join(MANIFEST)
    try:
        if manifest.is_local:
            with _open_regular(manifest) as f:
                data = f.read(_MAX_MANIFEST + 1)
        else:
            data = manifest.read_bytes()
    except FileNotFoundError:
        reason = "it does not exist" if not loc.exists() else f"it has no {MANIFEST} (incomplete or not a checkpoint)"
        raise checkpoint_error(path, reason) from None
    except (IsADirectoryError, NotADirectoryError, _NotRegular):
        raise checkpoint_error(path, f"its {MANIFEST} is not a regular file (a directory, FIFO or device); refusing "
                                     "to read it", damaged=True) from None
    except OSError as exc:
        raise checkpoint_error(path, f"its {MANIFEST} could not be read: {type(exc).__name__}: {exc}") from exc
    if len(data) > _MAX_MANIFEST:
        raise checkpoint_error(path, f"its {MANIFEST} is larger than {_MAX_MANIFEST} bytes; not a Kiln manifest")
    return parse_manifest(path, data)


def _require_directory(path: str, loc: Location) -> None:
    """A checkpoint is a directory: say so when given one of its files (or any file) instead."""
    try:
        is_file = os.path.isfile(loc.path) if loc.is_local else loc.fs.isfile(loc.path)
    except OSError:
        return
    if is_file:
        hint = f"; pass the folder that holds it: {redact(os.path.dirname(path.rstrip('/')))}" \
            if loc.name == MANIFEST else ""
        hint = hint or ("; a Lightning .ckpt file is a torch.save pickle: read its weights with "
                        "torch.load(path, weights_only=True)['state_dict']")
        raise checkpoint_error(path, f"it is a file, but a Kiln checkpoint is a directory (the one holding "
                                     f"{MANIFEST}){hint}")


class NoHash:
    """Stand-in hasher for unverified reads."""

    algorithm = "none"

    def update(self, data: Any) -> None:
        pass


def _open_regular(loc: Location) -> Any:
    """Open a local file for reading only if it is a regular file (a FIFO or device would block or never end)."""
    if not stat.S_ISREG(os.stat(loc.path).st_mode):
        raise _NotRegular
    fd = os.open(loc.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the two looks
        os.close(fd)
        raise _NotRegular
    return os.fdopen(fd, "rb")


class _NotRegular(Exception):
    pass


def _read_file(path: str, manifest: Manifest, rel: str, reader: Any, verify: bool) -> Any:
    entry = manifest.files[rel]
    root = locate(path)
    loc = root.join(rel)
    if loc.is_local and not _inside(root.path, loc.path):
        raise checkpoint_error(path, f"file {rel} resolves to a place outside the checkpoint directory (a symbolic "
                                     "link?); refusing to read it")
    try:
        with (_open_regular(loc) if loc.is_local else loc.open("rb")) as f:
            size = loc.size_of_open(f)
            if size != entry["size"]:
                raise checkpoint_error(path, f"file {rel} is damaged: it has {size} bytes, the manifest says "
                                             f"{entry['size']} (truncated or overwritten)", damaged=True)
            hasher = tensor_files.StreamHasher(tensor_files.split_checksum(entry["checksum"])) if verify else NoHash()
            result = reader(f, size, hasher, loc)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise checkpoint_error(path, f"file {rel} listed in the manifest is missing", damaged=True) from None
    except (IsADirectoryError, NotADirectoryError, _NotRegular):
        raise checkpoint_error(path, f"file {rel} listed in the manifest is not a regular file (a directory, FIFO "
                                     "or device); refusing to read it", damaged=True) from None
    except (ValueError, RecursionError, OverflowError) as exc:  # parsed before its checksum was complete
        raise checkpoint_error(path, f"file {rel} is damaged or unreadable: {type(exc).__name__}: {exc}"[:2000],
                               damaged=not _intact(loc, entry)) from None
    except (OSError, MemoryError, RuntimeError) as exc:
        raise checkpoint_error(path, f"file {rel} could not be read: {type(exc).__name__}: {exc}"[:2000]) from exc
    if verify and hasher.hexdigest() != entry["checksum"]:
        raise checkpoint_error(path, f"file {rel} is damaged: its checksum does not match the manifest",
                               damaged=True)
    return result


def _inside(root: str, path: str) -> bool:
    """Whether local ``path``, symbolic links resolved, lies inside directory ``root`` (itself resolved)."""
    real_root = os.path.realpath(root)
    return os.path.realpath(path).startswith(real_root.rstrip(os.sep) + os.sep)


def _intact(loc: Location, entry: FileEntry) -> bool:
    """Whether the file's bytes are what the manifest recorded (reads it once more: error paths only).

    Files over ``_MAX_RECHECK`` bytes count as damaged unread: an error path must not read for minutes.
    """
    if entry["size"] > _MAX_RECHECK:
        return False
    hasher, size = tensor_files.StreamHasher(tensor_files.split_checksum(entry["checksum"])), 0
    try:
        with loc.open("rb") as f:
            while chunk := f.read(16 * 2**20):
                hasher.update(chunk)
                size += len(chunk)
    except OSError:
        return False
    return size == entry["size"] and hasher.hexdigest() == entry["checksum"]


def read_state(path: str, name: str, manifest: Manifest | None = None, *, verify: bool = True,
               mapped: bool = False) -> Any:
    """Load state ``name`` (saved in either format) as CPU tensors; verifies size and checksum.

    ``mapped=True``: a local safetensors state comes back as views of a private map of its file, for state that
    is copied elsewhere at once (see :func:`~framework.checkpoint.tensor_files.read_safetensors`)."""
    manifest = manifest if manifest is not None else read_manifest(path)
    if f"{name}.safetensors" in manifest.files:
        if f"{name}.json" not in manifest.files:
            raise checkpoint_error(path, f"state {name!r} has no {name}.json skeleton")
        skeleton = _read_file(path, manifest, f"{name}.json", _read_json_skeleton, verify)
        tensors = _read_file(path, manifest, f"{name}.safetensors",
                             lambda f, size, h, loc: tensor_files.read_safetensors(loc, f, size, h, mapped=mapped),
                             verify)
        try:
            return unflatten_state(skeleton, tensors)
        except ValueError as exc:
            raise checkpoint_error(path, f"file {name}.json does not match {name}.safetensors: {exc}") from None
    if f"{name}.pt" in manifest.files:
        return _read_file(path, manifest, f"{name}.pt", lambda f, size, h, loc: pt_files.read_pt(f, size, h),
                          verify)
    raise checkpoint_error(path, f"it has no state {name!r}; it holds {manifest.state_names()}")


def _read_json_skeleton(f: Any, size: int, hasher: Any, loc: Location) -> Any:
    data = f.read(size + 1)
    if len(data) != size:
        raise ValueError(f"expected {size} bytes, read {len(data)}")
    hasher.update(data)
    return skeleton_from_json(data)


def verify_checkpoint(path: str, manifest: Manifest | None = None) -> Manifest:
    """Check the size and checksum of every file (e.g. before handing files to another reader)."""
    manifest = manifest if manifest is not None else read_manifest(path)

    def consume(f: Any, size: int, hasher: Any, loc: Location) -> None:
        while chunk := f.read(16 * 2**20):
            hasher.update(chunk)

    for rel in manifest.files:
        _read_file(path, manifest, rel, consume, verify=True)
    return manifest
