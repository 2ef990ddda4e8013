"""Tensor files with checksums over their bytes: safetensors (framework/checkpoint/tensor_files.py), torch.save
(pt_files.py) and the checksums (checksums.py)."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tempfile
import zlib

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.checkpoint import tensor_files
from framework.checkpoint.pt_files import read_pt, write_pt
from framework.checkpoint.serialization import flatten_state
from framework.checkpoint.storage import locate
from framework.checkpoint.tensor_files import (
    StreamHasher,
    read_safetensors,
    write_safetensors,
)

TENSORS = {
    "w": torch.randn(4, 3), "b64": torch.arange(5, dtype=torch.float64), "bf": torch.randn(3).bfloat16(),
    "mask": torch.tensor([True, False, True]), "byte": torch.arange(7, dtype=torch.uint8),
    "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3), "i16": torch.arange(3, dtype=torch.int16),
}


@pytest.fixture(params=["local", "memory"])
def where(request, tmp_path):
    """A directory to write tensor files into: a local folder or an fsspec memory:// one."""
    if request.param == "local":
        yield locate(str(tmp_path))
        return
    root = locate(f"memory://kiln-tensor-files-{os.urandom(4).hex()}")
    root.makedirs()
    yield root
    root.remove_tree()


def write(tensors, algorithm=None, where=None):
    loc = (where or locate(tempfile.mkdtemp())).join("t.safetensors")
    size, digest = write_safetensors(loc, tensors, algorithm=algorithm)
    data = loc.read_bytes()
    assert size == len(data)
    return data, digest


def read(data: bytes, size: int | None = None, hasher=None, where=None, mapped=False):
    loc = (where or locate(tempfile.mkdtemp())).join("r.safetensors")
    with loc.open("wb") as f:
        f.write(data)
    with loc.open("rb") as f:
        return read_safetensors(loc, f, len(data) if size is None else size, hasher or StreamHasher(), mapped=mapped)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k != "__metadata__"),
                       st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)), max_size=6))
def test_local_files_are_the_library_output_byte_for_byte(specs):
    """Kiln writes the bytes itself (hashing on the way), in the library's header layout and data order."""
    tensors = {name: torch.zeros(shape, dtype=dtype).random_(0, 2 if dtype is torch.bool else 100)
               for name, (dtype, shape) in specs.items()}
    data, digest = write(tensors)
    assert data == safetensors.torch.save(tensors)
    assert digest == f"xxh3_64:{__import__('xxhash').xxh3_64(data).hexdigest()}"


def test_large_tensors_are_streamed_in_chunks_with_one_checksum(tmp_path):
    tensors = {"big": torch.randn(3 * 2**18 + 7), "small": torch.arange(5), "mid": torch.randn(2**16)}
    data, digest = write(tensors, "crc32", where=locate(str(tmp_path)))
    assert data == safetensors.torch.save(tensors) and digest == f"crc32:{zlib.crc32(data):08x}"
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("big"), tensors["big"])


def test_large_writes_and_reads_move_whole_aligned_chunks(tmp_path, monkeypatch):
    """The page cache gets whole pages: past the header, every write and read of a large tensor ends at a file
    offset that is a multiple of the chunk size (or at the tensor's end)."""
    chunk = tensor_files._CHUNK
    tensors = {"a": torch.randn(2 * chunk // 4 + 3), "b": torch.randn(chunk // 4 + 1), "c": torch.arange(3)}
    prefix, names = tensor_files.safetensors_prefix(tensors)
    ends, offset = {}, len(prefix)
    for name in names:
        offset += tensors[name].numel() * tensors[name].element_size()
        ends[name] = offset
    spans, real_write, real_preadv = [], os.write, os.preadv

    def recording_write(fd, data):
        at = os.lseek(fd, 0, os.SEEK_CUR)
        written = real_write(fd, data)
        spans.append((at, at + written))
        return written

    def recording_preadv(fd, buffers, at):
        got = real_preadv(fd, buffers, at)
        spans.append((at, at + got))
        return got

    monkeypatch.setattr(os, "write", recording_write)
    data, digest = write(tensors, where=locate(str(tmp_path)))
    monkeypatch.setattr(os, "preadv", recording_preadv)
    with open(tmp_path / "t.safetensors", "rb") as f:
        hasher = StreamHasher()
        out = read_safetensors(locate(str(tmp_path / "t.safetensors")), f, len(data), hasher)
    assert hasher.hexdigest() == digest and all(torch.equal(out[k], t) for k, t in tensors.items())
    writes = spans[:6]  # the header with the small "c" gathered behind it, "a" in 3 pieces, "b" in 2
    assert writes[0] == (0, ends["c"]) and spans[6] == (len(prefix), ends["c"])
    assert spans[7:] == writes[1:]  # the read path cuts the large tensors at the same places
    for start, end in writes[1:]:
        assert end - start <= chunk and (end % chunk == 0 or end in ends.values()), (start, end)


def test_mapped_read_verifies_every_byte_and_gives_private_views(tmp_path):
    tensors = {"big": torch.randn(3 * 2**18 + 7), **TENSORS}
    data, digest = write(tensors, where=locate(str(tmp_path)))
    hasher = StreamHasher()
    out = read(data, hasher=hasher, where=locate(str(tmp_path)), mapped=True)
    assert hasher.hexdigest() == digest
    for k, t in tensors.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k], t), k
    out["big"].zero_()  # copy-on-write: the file keeps its bytes
    assert (tmp_path / "r.safetensors").read_bytes() == data


def test_our_files_are_standard_safetensors_with_aligned_tensors(where):
    data, _ = write(TENSORS, where=where)
    loaded = safetensors.torch.load(data)
    assert set(loaded) == set(TENSORS)
    for k, t in TENSORS.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t)
    head_len = int.from_bytes(data[:8], "little")
    assert (8 + head_len) % 8 == 0
    for name, spec in json.loads(data[8:8 + head_len]).items():
        if name != "__metadata__":
            assert spec["data_offsets"][0] % TENSORS[name].element_size() == 0


def test_files_written_by_safetensors_package_are_read(where):
    data = safetensors.torch.save({k: v for k, v in TENSORS.items()})
    out = read(data, where=where)
    for k, t in TENSORS.items():
        assert torch.equal(out[k], t)


def test_views_of_one_storage_and_non_contiguous_tensors_are_written():
    base = torch.arange(12.0)
    tensors = {"head": base[:6], "overlap": base[3:9], "tail": base[9:], "t": base.reshape(3, 4).t()}
    data, _ = write(tensors)
    for k, t in safetensors.torch.load(data).items():
        assert torch.equal(t, tensors[k]), k


@pytest.mark.parametrize(("algorithm", "one_shot"), [
    ("xxh3_64", lambda b: __import__("xxhash").xxh3_64(b).hexdigest()),
    ("crc32", lambda b: f"{zlib.crc32(b):08x}"),
    ("sha256", lambda b: __import__("hashlib").sha256(b).hexdigest()),
])
def test_checksum_equals_one_shot_hash_of_the_file(algorithm, one_shot, where):
    big = {"big": torch.randn(600_000), **TENSORS}  # > 1 MiB: hashed on the helper thread while reading
    data, digest = write(big, algorithm, where=where)
    assert digest == f"{algorithm}:{one_shot(data)}"
    reread = StreamHasher(algorithm)
    read(data, hasher=reread, where=where)
    assert reread.hexdigest() == digest


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3 * 2**20), max_size=6))
def test_hasher_is_order_preserving_across_small_and_large_updates(sizes):
    chunks = [os.urandom(n) if n < 4096 else bytes([n % 251]) * n for n in sizes]
    hasher = StreamHasher("crc32")
    for c in chunks:
        hasher.update(c)
    assert hasher.hexdigest() == f"crc32:{zlib.crc32(b''.join(chunks)):08x}"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3 * 2**20)), max_size=6))
def test_inline_and_threaded_updates_keep_the_stream_order(steps):
    chunks = [(inline, bytes([n % 251]) * n) for inline, n in steps]
    hasher = StreamHasher("crc32")
    for inline, c in chunks:
        (hasher.update_inline if inline else hasher.update)(c)
    assert hasher.hexdigest() == f"crc32:{zlib.crc32(b''.join(c for _, c in chunks)):08x}"


def test_default_algorithm_falls_back_to_stdlib_without_xxhash(monkeypatch):
    monkeypatch.setitem(sys.modules, "xxhash", None)
    assert tensor_files.default_algorithm() == "crc32"
    assert StreamHasher().hexdigest().startswith("crc32:")


def _header(entries: dict, data_len: int) -> bytes:
    head = json.dumps(entries).encode()
    return len(head).to_bytes(8, "little") + head + b"\0" * data_len


MALFORMED = [
    (b"\x05\0", "header too small"),
    ((10**9).to_bytes(8, "little") + b"{}", "header too large"),
    (_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 4), "not fully covered"),
    (_header({"a": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}, 4), "unknown variant `XX`"),
    (_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, 8), "invalid offset for tensor `b`"),
    (_header([1, 2], 0), "invalid type: sequence"),
    # the attack's shape: no element, but strides that overflow (torch raised a raw RuntimeError)
    (_header({"a": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, 0), "no tensor can have"),
    (_header({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, 16), "overflow"),
    (_header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4), "expected usize"),
    (_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 8), "not fully covered"),
]


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize(("data", "match"), MALFORMED)
def test_malformed_safetensors_raise_valueerror(data, match, where, mapped):
    with pytest.raises(ValueError, match=match):
        read(data, where=where, mapped=mapped)


@pytest.mark.parametrize("mapped", [False, True])
@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("ab", min_size=1, max_size=2), st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "U8", "I64", "BOOL", "XX", 3]),
    "shape": st.lists(st.one_of(st.integers(-2, 4), st.integers(2**30, 2**64), st.just("x")), max_size=4),
    "data_offsets": st.lists(st.integers(-1, 40), min_size=0, max_size=3)}), max_size=3),
    st.integers(0, 40))
def test_any_header_either_loads_consistently_or_raises_valueerror(mapped, entries, data_len):
    """Fails closed: a header either describes the file exactly (tensors of the declared shapes come back)
    or raises ValueError; never another exception, never an allocation beyond the file."""
    data = _header(entries, data_len)
    try:
        out = read(data, mapped=mapped)
    except ValueError:
        return
    for name, t in out.items():
        assert list(t.shape) == entries[name]["shape"]
        assert t.numel() * t.element_size() <= data_len


def test_truncated_file_detected_even_if_size_claims_more():
    data, _ = write(TENSORS)
    with pytest.raises(ValueError, match="not fully covered|truncated|invalid"):
        read(data[:-5], size=len(data))


def test_unsupported_dtype_for_safetensors_names_the_tensor():
    with pytest.raises(TypeError, match="'c128'.*safe_serialization=False"):
        write({"c128": torch.zeros(2, dtype=torch.complex128)})


def test_pt_roundtrip_keeps_ties_and_checksum_matches():
    shared = torch.randn(3)
    tensors, skeleton = flatten_state({"a": shared, "b": shared, "t": (1, 2)})
    f, hasher = io.BytesIO(), StreamHasher()
    size = write_pt(f, tensors, skeleton, hasher)
    again = StreamHasher()
    out = read_pt(io.BytesIO(f.getvalue()), size, again)
    assert again.hexdigest() == hasher.hexdigest()
    assert out["a"] is out["b"] and out["t"] == (1, 2)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"weights": torch.ones(1), "payload": _Exploit(str(marker))}, buf)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_pt(io.BytesIO(buf.getvalue()), len(buf.getvalue()), StreamHasher())
    raw = pickle.dumps(_Exploit(str(marker)))  # a bare pickle, not even a torch zip file
    with pytest.raises(ValueError):
        read_pt(io.BytesIO(raw), len(raw), StreamHasher())
    assert not marker.exists()


def test_foreign_plain_torch_save_file_loads_as_is():
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    out = read_pt(io.BytesIO(buf.getvalue()), len(buf.getvalue()), StreamHasher())
    assert torch.equal(out["w"], torch.ones(2))


@pytest.mark.parametrize("err, fails", [("ENOSPC", True), ("EOPNOTSUPP", False)])
def test_block_reservation_fails_a_full_disk_early_and_is_skipped_where_unsupported(tmp_path, monkeypatch, err, fails):
    import ctypes
    import errno

    def fallocate(fd, mode, offset, length):
        ctypes.set_errno(getattr(errno, err))
        return -1

    monkeypatch.setattr(tensor_files, "_fallocate", lambda: fallocate)
    loc = locate(str(tmp_path / "t.safetensors"))
    if fails:
        with pytest.raises(OSError) as raised:
            write_safetensors(loc, TENSORS)
        assert raised.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())  # nothing left behind
    else:
        write_safetensors(loc, TENSORS)
        assert (tmp_path / "t.safetensors").read_bytes() == safetensors.torch.save(TENSORS)
