"""Tensor files with checksums over their bytes: safetensors (default) and torch.save (opt-in).

safetensors files are written and parsed by the ``safetensors`` library (its header parser is fuzzed
upstream); Kiln adds the checksum of every byte, computed from the page cache after a write and
tensor by tensor while reading. torch.save files are only ever read back with ``weights_only=True``.
Malformed content raises ``ValueError``.
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
from framework.checkpoint.storage import Location

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


def _unsupported(name: str, t: torch.Tensor) -> TypeError:
    return TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store: "
                     "use safe_serialization=False or convert it")


def _writable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors, none overlapping another's memory (the library refuses both)."""
    from safetensors.torch import _SIZE

    out: dict[str, torch.Tensor] = {}
    by_storage: dict[int, list[str]] = {}
    for name, t in tensors.items():
        if t.dtype not in _SIZE:
            raise _unsupported(name, t)
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        out[name] = t.contiguous()
        if out[name].numel():
            by_storage.setdefault(out[name].untyped_storage().data_ptr(), []).append(name)
    for names in by_storage.values():  # distinct views of one storage: copy those that overlap an earlier one
        end = -1
        for name in sorted(names, key=lambda n: out[n].data_ptr()):
            t = out[name]
            if t.data_ptr() < end:
                out[name] = t.clone()
            else:
                end = t.data_ptr() + t.numel() * t.element_size()
    return out


def _hash_local(path: str, algorithm: str) -> tuple[int, str]:
    """Size and checksum of a local file, hashed through a read-only map of the page cache (no copy)."""
    import mmap

    digest = _hash_factory(algorithm)()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                digest.update(mapped)
    return size, f"{algorithm}:{digest.hexdigest()}"


def write_safetensors(loc: Location, tensors: dict[str, torch.Tensor], *, fsync: bool = False,
                      algorithm: str | None = None) -> tuple[int, str]:
    """Write ``tensors`` to ``loc`` with the safetensors library; returns (size, checksum of the file's bytes).

    Locally the library writes the file itself and the checksum is computed afterwards from the page
    cache (cheaper than streaming it through a Python file object: see benchmarks/RESULTS.md); on
    object stores the serialized bytes are hashed and uploaded in one PUT.
    """
    from safetensors.torch import save, save_file

    algorithm = algorithm or default_algorithm()
    tensors = _writable(tensors)
    if not loc.is_local:
        data = save(tensors)
        digest = _hash_factory(algorithm)()
        digest.update(data)
        with loc.open("wb") as f:
            f.write(data)
        return len(data), f"{algorithm}:{digest.hexdigest()}"
    save_file(tensors, loc.path)
    if fsync:
        fd = os.open(loc.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return _hash_local(loc.path, algorithm)


def _header(read_at: Callable[[int, int], bytes], size: int) -> tuple[bytes, list[str]]:
    """The file's first ``8 + header`` bytes and its tensor names in data order (header already validated)."""
    prefix = read_at(0, 8)
    head = read_at(8, int.from_bytes(prefix, "little"))
    header = json.loads(head)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    for name in names:  # torch computes strides from the shape even when it holds no element
        shape = header[name]["shape"]
        if not all(type(d) is int and d >= 0 for d in shape) or math.prod(max(d, 1) for d in shape) >= 2**62:
            raise ValueError(f"tensor {name!r} has shape {shape}, which no tensor can have")
    return prefix + head, names


def _check_fits_in_memory(nbytes: int) -> None:
    """Refuse before allocating when the tensors (whose total the header and manifest agree on) exceed RAM."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > physical:
        raise MemoryError(f"its tensors hold {nbytes} bytes, more than this machine's {physical} bytes of memory")


def _bytes_of(t: torch.Tensor) -> Any:
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def read_safetensors(loc: Location, f: IO[bytes], size: int, hasher: Any) -> dict[str, torch.Tensor]:
    """Read the safetensors file open as ``f`` (``size`` bytes) into fresh CPU tensors, feeding ``hasher``
    the file's bytes in order.

    The library parses and validates the header first (shapes, overflow, offsets covering exactly the
    file's data), so nothing is allocated for a header that does not fit the file; errors are ValueError.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    try:
        if not loc.is_local:
            data = f.read(size + 1)
            if len(data) != size:
                raise ValueError(f"file is truncated or grew (expected {size} bytes, read {len(data)})")
            def read_at(at: int, n: int) -> bytes:
                return data[at:at + n]

            try:
                out = load(data)  # the library validates the header first
            except RuntimeError:
                _header(read_at, size)  # a shape torch cannot build: say which
                raise
            _, order = _header(read_at, size)
            hasher.update(data)
            return {name: out[name] for name in order}
        fd = f.fileno()
        # Open the very file we checked (no second lookup by name that a swapped file could win).
        path = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else loc.path
        with safe_open(path, framework="pt", device="cpu", backend="pread") as st:
            head, order = _header(lambda at, n: os.pread(fd, n, at), size)
            _check_fits_in_memory(size - len(head))
            hasher.update(head)
            out = {}
            for name in order:
                out[name] = st.get_tensor(name)
                hasher.update(_bytes_of(out[name]))
        return out
    except SafetensorError as exc:
        raise ValueError(f"invalid safetensors file: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OverflowError, RuntimeError) as exc:
        raise ValueError(f"invalid safetensors header: {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------- torch.save (opt-in)


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
