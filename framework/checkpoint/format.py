"""The checkpoint format: what a committed checkpoint directory is, and its manifest.

A checkpoint is one directory of state files plus a ``manifest.json`` written last that lists
every file with its size and checksum; a directory without a valid manifest is not a checkpoint.
Local checkpoints are written into a hidden staging dir ``.<name>.tmp-<token>`` beside the target
and renamed into place; fsspec URLs are written in place, manifest last (one atomic PUT).

Layout the Trainer writes (states are named, one name = one or two files)::

    model.safetensors + model.json      module state dict (rank 0)        [or model.pt]
    trainer.safetensors + trainer.json  optimizers, schedulers, loop, callbacks (rank 0)
    rank-{r}.safetensors + rank-{r}.json  per-rank RNG and data position
    manifest.json                       written last by rank 0

Writing lives in :mod:`framework.checkpoint.save`, reading in :mod:`framework.checkpoint.load`,
discovery and removal in :mod:`framework.checkpoint.discovery`.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

import framework.checkpoint.tensor_files as tensor_files
from framework.checkpoint.storage import redact

FORMAT = "kiln-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model"
TRAINER = "trainer"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
STATE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}")
SIDECAR = ".entries-rank-{rank}.json"
PENDING_MARK = ".kiln-pending"  # in a remote checkpoint being written (no atomic rename there): cleanup_stale's mark


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


def safe_relpath(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return False
    if re.match(r"[A-Za-z]:", rel):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def jsonable(metadata: Mapping[str, Any]) -> dict[str, Any]:
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


def manifest_checksum(doc: Mapping[str, Any], algorithm: str) -> str:
    hasher = tensor_files.StreamHasher(algorithm)
    hasher.update(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    return hasher.hexdigest()


def parse_manifest(path: str, data: bytes) -> Manifest:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("it is not a Kiln manifest")
        if not isinstance(doc.get("format_version"), int) or doc["format_version"] > FORMAT_VERSION:
            raise ValueError(f"format_version {doc.get('format_version')!r} is newer than this Kiln "
                             f"({FORMAT_VERSION}); upgrade Kiln to load it")
        checksum = doc.pop("checksum", None)
        if not isinstance(checksum, str) or manifest_checksum(doc, tensor_files.split_checksum(checksum)) != checksum:
            raise ValueError("its checksum does not match its content")
        files: dict[str, FileEntry] = {}
        for e in doc["files"]:
            if not safe_relpath(e.get("path")) or e["path"] == MANIFEST or e["path"] in files:
                raise ValueError(f"file path {e.get('path')!r} is unsafe or repeated (must stay inside the checkpoint)")
            if type(e.get("size")) is not int or e["size"] < 0 or not isinstance(e.get("checksum"), str):
                raise ValueError(f"entry {e!r} lacks a valid size or checksum")
            tensor_files.split_checksum(e["checksum"])
            files[e["path"]] = FileEntry(path=e["path"], size=e["size"], checksum=e["checksum"])
        world_size, created = doc["world_size"], doc["created"]
        if type(world_size) is not int or not 1 <= world_size <= 2**31:
            raise ValueError(f"world_size {world_size!r} is not a positive integer")
        if type(created) not in (int, float) or not math.isfinite(created):
            raise ValueError(f"created {created!r} is not a finite timestamp")
        if not isinstance(doc["metadata"], dict):
            raise ValueError("metadata is not an object")
        manifest = Manifest(path=path, format_version=doc["format_version"], world_size=world_size,
                            strategy=str(doc["strategy"]), layout=str(doc["layout"]), created=float(created),
                            metadata=dict(doc["metadata"]), files=files)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError, MemoryError) as exc:
        raise checkpoint_error(path, f"{MANIFEST} is invalid: {type(exc).__name__}: {exc}"[:2000]) from None
    return manifest

