"""Checksums of byte streams, as ``"<algorithm>:<hex>"``: xxh3 when the xxhash package is there, else crc32.

Every checkpoint file's checksum is recorded in the manifest and verified on read.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["StreamHasher", "default_algorithm", "hash_factory", "split_checksum"]


class _Crc32:
    """Stdlib fallback with the hashlib interface (used when xxhash is not installed)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def hash_factory(algorithm: str) -> Callable[[], Any]:
    """The constructor of ``algorithm``'s hash object (hashlib interface); ValueError if unknown."""
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
        self._hash = hash_factory(self.algorithm)()
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

    def update_inline(self, data: Any) -> None:
        """Hash ``data`` now, on this thread: for a chunk just read or about to be written, still in this
        core's cache (a second core would read it from memory again)."""
        self._catch_up()
        self._hash.update(data)

    def _flush(self) -> None:
        if self._pending:
            self._futures.append(_hash_executor().submit(self._hash.update, bytes(self._pending)))
            self._pending.clear()

    def _catch_up(self) -> None:
        """Wait for the helper thread's updates, then hash the batched small buffers (always the newest bytes)
        here: handing a few KiB to the thread costs more in wake-up latency than hashing them."""
        for future in self._futures:
            future.result()
        self._futures.clear()
        if self._pending:
            self._hash.update(self._pending)
            self._pending.clear()

    def hexdigest(self) -> str:
        self._catch_up()
        return f"{self.algorithm}:{self._hash.hexdigest()}"


def split_checksum(checksum: str) -> str:
    """Return the algorithm of a ``"<algorithm>:<hex>"`` checksum (ValueError if malformed)."""
    algorithm, sep, digest = checksum.partition(":")
    if not sep or not digest:
        raise ValueError(f"malformed checksum {checksum!r}")
    hash_factory(algorithm)
    return algorithm
