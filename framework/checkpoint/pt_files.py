"""torch.save checkpoint files (opt-in, ``safe_serialization=False``), checksummed as they are written and
read, and only ever read back with ``weights_only=True`` (never running pickled code)."""

from __future__ import annotations

import io
from typing import IO, Any

import torch

from framework.checkpoint.checksums import StreamHasher
from framework.checkpoint.serialization import (
    TREE_FORMAT,
    TREE_VERSION,
    skeleton_from_json,
    skeleton_to_json,
    unflatten_state,
)

__all__ = ["write_pt", "read_pt"]


def _readinto_exact(f: IO[bytes], view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"file is truncated (needed {view.nbytes - got} more bytes)")
        got += n


class _HashingWriter:
    """File-like object for torch.save that checksums and counts what passes through."""

    def __init__(self, f: IO[bytes], hasher: StreamHasher) -> None:
        self._f, self._hasher, self.size = f, hasher, 0

    def write(self, data: Any) -> int:
        data = bytes(data)  # torch may reuse its buffer after write() returns
        self._f.write(data)
        self._hasher.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._f.flush()


def write_pt(f: IO[bytes], tensors: dict[str, torch.Tensor], skeleton: Any, hasher: StreamHasher) -> int:
    """Write tensors + skeleton as one torch.save file (plain dict of str and tensors); returns size."""
    writer = _HashingWriter(f, hasher)
    payload = {"format": TREE_FORMAT, "version": TREE_VERSION,
               "tree": skeleton_to_json(skeleton).decode(), "tensors": dict(tensors)}
    torch.save(payload, writer)
    return writer.size


def read_pt(f: IO[bytes], size: int, hasher: StreamHasher) -> Any:
    """Read a torch.save file with ``weights_only=True`` (never runs arbitrary pickled code)."""
    import pickle

    data = bytearray(size)
    _readinto_exact(f, memoryview(data))
    hasher.update(data)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError("refusing to unpickle it: it holds objects other than tensors and plain "
                         f"containers (loaded with weights_only=True): {exc}") from None
    except (RuntimeError, EOFError) as exc:
        raise ValueError(f"not a readable torch.save file: {exc}") from exc
    if isinstance(payload, dict) and payload.get("format") == TREE_FORMAT:
        tensors = payload.get("tensors")
        if not isinstance(tensors, dict) or not isinstance(payload.get("tree"), str):
            raise ValueError("torch.save payload lacks its tree or tensors")
        return unflatten_state(skeleton_from_json(payload["tree"].encode()), tensors)
    return payload  # a plain (safely loaded) torch.save file from elsewhere
