"""Tensor files with streaming checksums: safetensors (default) and torch.save (opt-in).

safetensors files are written and read here directly (same on-disk format as the safetensors
package) so every byte is checksummed while it streams, without an extra copy; the checksum runs
on a helper thread and overlaps the I/O. torch.save files are only ever read back with
``weights_only=True``. Malformed content raises ``ValueError``.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import torch

from framework.checkpoint.serialization import (
    TREE_FORMAT,
    TREE_VERSION,
    skeleton_from_json,
    skeleton_to_json,
    unflatten_state,
)

_MAX_HEADER = 100 * 2**20

# ----------------------------------------------------------------------------- checksums


class _Crc32:
    """Stdlib fallback with the hashlib interface (used when xxhash is not installed)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def _hash_factory(algorithm: str) -> Callable[[], Any]:
    if algorithm in ("xxh3_64", "xxh3_128"):
        import xxhash

        return getattr(xxhash, algorithm)
    if algorithm == "crc32":
        return _Crc32
    if algorithm == "sha256":
        import hashlib

        return hashlib.sha256
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def default_algorithm() -> str:
    """xxh3_64 (~20 GB/s) when the xxhash package is importable, else zlib's crc32 (~4 GB/s)."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_SMALL = 1 << 20


def _forget_executor_after_fork() -> None:
    global _executor
    _executor = None  # its thread does not exist in a forked child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor_after_fork)


def _hash_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-checksum")
        return _executor


class StreamHasher:
    """Checksum of a byte stream, as ``"<algorithm>:<hex>"``.

    Large buffers are hashed on a helper thread (the hash functions release the GIL), so the
    checksum overlaps the write/read of the next buffer. Buffers must not change until
    :meth:`hexdigest` returns. Small buffers are batched to keep per-call overhead low.
    """

    def __init__(self, algorithm: str | None = None) -> None:
        self.algorithm = algorithm or default_algorithm()
        self._hash = _hash_factory(self.algorithm)()
        self._pending = bytearray()
        self._futures: list[Future] = []

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if view.nbytes < _SMALL:
            self._pending += view
            if len(self._pending) >= _SMALL:
                self._flush()
            return
        self._flush()
        self._futures.append(_hash_executor().submit(self._hash.update, view))

    def _flush(self) -> None:
        if self._pending:
            self._futures.append(_hash_executor().submit(self._hash.update, bytes(self._pending)))
            self._pending.clear()

    def hexdigest(self) -> str:
        self._flush()
        for future in self._futures:
            future.result()
        self._futures.clear()
        return f"{self.algorithm}:{self._hash.hexdigest()}"


def split_checksum(checksum: str) -> str:
    """Return the algorithm of a ``"<algorithm>:<hex>"`` checksum (ValueError if malformed)."""
    algorithm, sep, digest = checksum.partition(":")
    if not sep or not digest:
        raise ValueError(f"malformed checksum {checksum!r}")
    _hash_factory(algorithm)
    return algorithm


# ----------------------------------------------------------------------------- safetensors


_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.complex64: "C64", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e8m0fnu", "F8_E8M0")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_CODES = {code: dtype for dtype, code in _DTYPES.items()}


def _raw_bytes(t: torch.Tensor) -> Any:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors(f: IO[bytes], tensors: dict[str, torch.Tensor], hasher: StreamHasher) -> int:
    """Write ``tensors`` to ``f`` in safetensors format, checksumming as it goes; returns the size.

    Tensors are ordered by decreasing element size so that every tensor is aligned to its own
    element size (the header is padded to 8 bytes), which makes zero-copy reads possible.
    """
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in items:
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store: "
                            "use safe_serialization=False or convert it")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    prefix = len(head).to_bytes(8, "little") + head
    f.write(prefix)
    hasher.update(prefix)
    for _, t in items:
        if t.numel():
            data = _raw_bytes(t)
            hasher.update(data)  # first: the helper thread hashes these bytes while they are written
            f.write(data)
    return len(prefix) + offset


def _readinto_exact(f: IO[bytes], view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"file is truncated (needed {view.nbytes - got} more bytes)")
        got += n


def _skip(f: IO[bytes], nbytes: int, hasher: StreamHasher) -> None:
    while nbytes > 0:
        chunk = bytearray(min(nbytes, 16 * 2**20))
        _readinto_exact(f, memoryview(chunk))
        hasher.update(chunk)
        nbytes -= len(chunk)


def _parse_header(header: Any, data_len: int) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    entries = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = _CODES[spec["dtype"]], spec["shape"], spec["data_offsets"]
            ok = all(type(d) is int and d >= 0 for d in shape) and type(begin) is int and type(end) is int
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"safetensors header entry {name!r} is invalid: {spec!r}")
        entries.append((name, dtype, shape, begin, end))
    return sorted(entries, key=lambda e: e[3])


def read_safetensors(f: IO[bytes], size: int, hasher: StreamHasher) -> dict[str, torch.Tensor]:
    """Read a safetensors stream of ``size`` bytes into fresh CPU tensors, feeding ``hasher``."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError("file is truncated (no safetensors header)")
    head_len = int.from_bytes(prefix, "little")
    if head_len > min(size - 8, _MAX_HEADER):
        raise ValueError(f"safetensors header length {head_len} does not fit a {size}-byte file")
    head = bytearray(head_len)
    _readinto_exact(f, memoryview(head))
    hasher.update(prefix)
    hasher.update(head)
    data_len = size - 8 - head_len
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for name, dtype, shape, begin, end in _parse_header(json.loads(head), data_len):
        if begin < pos:
            raise ValueError(f"safetensors tensor {name!r} overlaps the previous one")
        _skip(f, begin - pos, hasher)
        t = torch.empty(shape, dtype=dtype)
        if end > begin:
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            _readinto_exact(f, view)
            hasher.update(view)
        out[name] = t
        pos = end
    _skip(f, data_len - pos, hasher)
    return out


# ----------------------------------------------------------------------------- torch.save (opt-in)


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
