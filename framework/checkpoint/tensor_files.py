"""safetensors files with checksums over their bytes (the default tensor format of checkpoints).

safetensors files are standard ones, byte for byte what the ``safetensors`` library writes (its header
layout and data order, checked in the tests), but Kiln streams the tensor bytes to the file itself in
256 KiB chunks and hashes each chunk while it is in the CPU cache: one pass over memory instead of the
library's write plus a second pass for the checksum. Reading, the library parses and validates the header
(fuzzed upstream); Kiln re-checks the layout it uses, then reads each tensor in chunks into fresh memory,
hashing each chunk as it lands. Malformed content raises ``ValueError``. The opt-in torch.save format is
:mod:`framework.checkpoint.pt_files`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import mmap
import os
from collections.abc import Callable, Iterator
from typing import IO, Any

import torch

from framework.checkpoint.checksums import StreamHasher, default_algorithm, hash_factory, split_checksum
from framework.checkpoint.storage import Location

__all__ = ["StreamHasher", "default_algorithm", "split_checksum", "safetensors_prefix", "write_safetensors",
           "read_safetensors"]

_CHUNK = 1 << 18  # hashed right after it is written or read, while it is still in the CPU cache
_SMALL_WRITE = 1 << 16  # smaller tensors are gathered into one write() call

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


@functools.lru_cache(maxsize=1)
def _library_dtype_order() -> dict[torch.dtype, tuple[int, str]]:
    """Each dtype's rank in the library's data order (and its name there), learned from the library itself:
    it sorts tensors by dtype (its own ranking, widest first), then by name."""
    from safetensors.torch import _TYPES, save

    probe = {}
    for name, dtype in _TYPES.items():
        try:
            probe[name] = torch.zeros(1, dtype=dtype)
        except (RuntimeError, TypeError):  # a dtype this torch build cannot allocate
            continue
    data = save(probe)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    order = sorted(header.keys() - {"__metadata__"}, key=lambda k: header[k]["data_offsets"][0])
    return {_TYPES[name]: (rank, name) for rank, name in enumerate(order)}


def safetensors_prefix(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The first bytes of the safetensors file of ``tensors`` (length + JSON header, padded as the library pads
    it) and the tensor names in the order their data follows; ``tensors`` as :func:`_writable` returns them."""
    order = _library_dtype_order()
    names = sorted(tensors, key=lambda k: (order[tensors[k].dtype][0], k))
    entries, offset = {}, 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": order[t.dtype][1], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, names


def _bytes_of(t: torch.Tensor) -> Any:
    """The tensor's memory as a flat byte memoryview (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, view.nbytes, _CHUNK):
        yield view[start:start + _CHUNK]


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view.nbytes:
        view = view[os.write(fd, view):]


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks in one call (cheaper than the filesystem reserving them page by page while the
    data is written; a full disk fails here, before any byte is written). Skipped where unsupported."""
    import ctypes
    import errno

    fallocate = _fallocate()
    if fallocate is not None and size and fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))


@functools.lru_cache(maxsize=1)
def _fallocate() -> Any:
    """libc's fallocate(2) (not posix_fallocate, which emulates it by writing zeros where unsupported)."""
    import ctypes

    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate


def _stream_to_fd(fd: int, prefix: bytes, names: list[str], tensors: dict[str, torch.Tensor], digest: Any) -> int:
    """Write the file's bytes to ``fd``, each chunk hashed right after its write(), while the chunk is still in
    the CPU cache (the write brought it there): one pass over memory."""
    digest.update(prefix)
    pending = bytearray(prefix)
    size = len(prefix)
    for name in names:
        view = _bytes_of(tensors[name])
        offset, nbytes = size, view.nbytes  # where the tensor starts in the file
        size += nbytes
        if nbytes < _SMALL_WRITE:
            digest.update(view)
            pending += view
            continue
        if pending:
            _write_all(fd, pending)
            pending = bytearray()
        write, update = os.write, digest.update
        # Chunks end at file offsets that are multiples of _CHUNK, so the page cache can hold each in one large
        # folio (the header leaves the data unaligned; unaligned or merely page-aligned writes measured ~9 % slower).
        start, end = 0, min(nbytes, _CHUNK - offset % _CHUNK)
        while start < nbytes:  # the hot loop: ~2,300 turns per 576 MiB
            chunk = view[start:end]
            written = write(fd, chunk)
            if written != chunk.nbytes:
                _write_all(fd, chunk[written:])
            update(chunk)
            start, end = end, min(nbytes, end + _CHUNK)
    if pending:
        _write_all(fd, pending)
    return size


def write_safetensors(loc: Location, tensors: dict[str, torch.Tensor], *, fsync: bool = False,
                      algorithm: str | None = None) -> tuple[int, str]:
    """Write ``tensors`` to ``loc`` as a safetensors file; returns (size, checksum of the file's bytes).

    Locally the bytes go straight from the tensors to the file, hashed chunk by chunk on the way (the
    layout is the library's own: :func:`safetensors_prefix`); on object stores the library serializes the
    file into memory, which is hashed and uploaded in one PUT.
    """
    algorithm = algorithm or default_algorithm()
    digest = hash_factory(algorithm)()
    tensors = _writable(tensors)
    if not loc.is_local:
        from safetensors.torch import save

        data = save(tensors)
        digest.update(data)
        with loc.open("wb") as f:
            f.write(data)
        return len(data), f"{algorithm}:{digest.hexdigest()}"
    prefix, names = safetensors_prefix(tensors)
    partial = f"{loc.path}.partial-{os.urandom(4).hex()}"  # renamed into place once complete, as the library does
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            _preallocate(fd, len(prefix) + sum(tensors[n].numel() * tensors[n].element_size() for n in names))
            size = _stream_to_fd(fd, prefix, names, tensors, digest)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, loc.path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    return size, f"{algorithm}:{digest.hexdigest()}"


def _layout(read_at: Callable[[int, int], bytes], size: int) -> tuple[bytes, list[tuple[str, torch.dtype, list, int]]]:
    """The file's first ``8 + header`` bytes and its tensors as (name, dtype, shape, file offset) in data order.

    The library validated the header already; this re-checks what the read relies on (known dtypes, shapes,
    each tensor's bytes following the previous one's up to the end of the file), against the bytes read here.
    """
    from safetensors.torch import _TYPES

    prefix = read_at(0, 8)
    head = read_at(8, int.from_bytes(prefix, "little"))
    header = json.loads(head)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    out, at = [], 8 + len(head)
    for name in names:
        shape, (start, end) = header[name]["shape"], header[name]["data_offsets"]
        if not all(type(d) is int and d >= 0 for d in shape) or math.prod(max(d, 1) for d in shape) >= 2**62:
            raise ValueError(f"tensor {name!r} has shape {shape}, which no tensor can have")
        dtype = _TYPES[header[name]["dtype"]]
        if 8 + len(head) + start != at or end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name!r} has data offsets {[start, end]} that do not follow its predecessor "
                             f"or do not fit its shape {shape}")
        out.append((name, dtype, shape, at))
        at += end - start
    if at != size:
        raise ValueError(f"the header describes {at} bytes, the file has {size}")
    return prefix + head, out


def _check_fits_in_memory(nbytes: int) -> None:
    """Refuse before allocating when the tensors (whose total the header and manifest agree on) exceed RAM."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > physical:
        raise MemoryError(f"its tensors hold {nbytes} bytes, more than this machine's {physical} bytes of memory")


def _read_hashed(fd: int, view: memoryview, at: int, update: Callable[[Any], None]) -> None:
    """Fill ``view`` from file offset ``at`` in chunks (ending at file offsets that are multiples of _CHUNK),
    hashing each chunk right after it was read."""
    first = min(view.nbytes, _CHUNK - at % _CHUNK)
    for chunk in itertools.chain((view[:first],), _chunks(view[first:])):
        got = 0
        while got < chunk.nbytes:
            n = os.preadv(fd, [chunk[got:]], at)
            if not n:
                raise ValueError("file is truncated (it changed while being read)")
            got, at = got + n, at + n
        update(chunk)


def _mapped_tensors(fd: int, size: int, order: list, update: Callable[[Any], None]) -> dict[str, torch.Tensor]:
    """The tensors as views of a private (copy-on-write) map of the file, every byte hashed through the map."""
    mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if os.fstat(fd).st_size < size:  # shrunk since it was measured: touching the missing pages would SIGBUS
        mapped.close()
        raise ValueError("file is truncated (it changed while being read)")
    view = memoryview(mapped)
    for chunk in _chunks(view):
        update(chunk)
    out = {}
    for name, dtype, shape, at in order:
        count = math.prod(shape)
        out[name] = (torch.frombuffer(view, dtype=dtype, count=count, offset=at).view(shape) if count
                     else torch.empty(shape, dtype=dtype))
    return out


def read_safetensors(loc: Location, f: IO[bytes], size: int, hasher: Any, *,
                     mapped: bool = False) -> dict[str, torch.Tensor]:
    """Read the safetensors file open as ``f`` (``size`` bytes) into fresh CPU tensors, feeding ``hasher``
    the file's bytes in order.

    ``mapped=True`` (local files) returns views of a private map of the file instead, for state that is copied
    elsewhere right away (a module's weights): the page cache then is the one transient copy, as with the
    library's own ``load_file``. Like that, it assumes nobody truncates the file while the views are alive
    (Kiln never does; reading a page cut off from a map kills the process with SIGBUS).

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
                _layout(read_at, size)  # a shape torch cannot build: say which
                raise
            _, order = _layout(read_at, size)
            hasher.update(data)
            return {name: out[name] for name, *_ in order}
        fd = f.fileno()
        # Open the very file we checked (no second lookup by name that a swapped file could win).
        path = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else loc.path
        with safe_open(path, framework="pt", device="cpu", backend="pread"):
            pass  # the library's header validation
        head, order = _layout(lambda at, n: os.pread(fd, n, at), size)
        update = getattr(hasher, "update_inline", hasher.update)
        if mapped and hasattr(mmap, "MAP_PRIVATE"):  # POSIX; elsewhere fresh tensors
            return _mapped_tensors(fd, size, order, update)
        _check_fits_in_memory(size - len(head))
        update(head)
        out = {}
        for name, dtype, shape, at in order:
            out[name] = torch.empty(shape, dtype=dtype)
            _read_hashed(fd, _bytes_of(out[name]), at, update)
        return out
    except SafetensorError as exc:
        raise ValueError(f"invalid safetensors file: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OverflowError, RuntimeError) as exc:
        raise ValueError(f"invalid safetensors header: {type(exc).__name__}: {exc}") from None
