"""Tensor files with streaming checksums (framework/checkpoint/tensor_files.py)."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import zlib

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.checkpoint import tensor_files
from framework.checkpoint.serialization import flatten_state
from framework.checkpoint.tensor_files import (
    StreamHasher,
    read_pt,
    read_safetensors,
    write_pt,
    write_safetensors,
)

TENSORS = {
    "w": torch.randn(4, 3), "b64": torch.arange(5, dtype=torch.float64), "bf": torch.randn(3).bfloat16(),
    "mask": torch.tensor([True, False, True]), "byte": torch.arange(7, dtype=torch.uint8),
    "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3), "i16": torch.arange(3, dtype=torch.int16),
}


def write(tensors, algorithm=None):
    f, hasher = io.BytesIO(), StreamHasher(algorithm)
    size = write_safetensors(f, tensors, hasher)
    assert size == len(f.getvalue())
    return f.getvalue(), hasher.hexdigest()


def test_our_files_are_standard_safetensors_with_aligned_tensors():
    data, _ = write(TENSORS)
    loaded = safetensors.torch.load(data)
    assert set(loaded) == set(TENSORS)
    for k, t in TENSORS.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t)
    head_len = int.from_bytes(data[:8], "little")
    assert (8 + head_len) % 8 == 0
    for name, spec in json.loads(data[8:8 + head_len]).items():
        if name != "__metadata__":
            assert spec["data_offsets"][0] % TENSORS[name].element_size() == 0


def test_files_written_by_safetensors_package_are_read():
    data = safetensors.torch.save({k: v for k, v in TENSORS.items()})
    out = read_safetensors(io.BytesIO(data), len(data), StreamHasher())
    for k, t in TENSORS.items():
        assert torch.equal(out[k], t)


@pytest.mark.parametrize(("algorithm", "one_shot"), [
    ("xxh3_64", lambda b: __import__("xxhash").xxh3_64(b).hexdigest()),
    ("crc32", lambda b: f"{zlib.crc32(b):08x}"),
    ("sha256", lambda b: __import__("hashlib").sha256(b).hexdigest()),
])
def test_streaming_checksum_equals_one_shot_hash_of_the_file(algorithm, one_shot):
    big = {"big": torch.randn(600_000), **TENSORS}  # > 1 MiB: hashed on the helper thread
    data, digest = write(big, algorithm)
    assert digest == f"{algorithm}:{one_shot(data)}"
    reread = StreamHasher(algorithm)
    read_safetensors(io.BytesIO(data), len(data), reread)
    assert reread.hexdigest() == digest


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3 * 2**20), max_size=6))
def test_hasher_is_order_preserving_across_small_and_large_updates(sizes):
    chunks = [os.urandom(n) if n < 4096 else bytes([n % 251]) * n for n in sizes]
    hasher = StreamHasher("crc32")
    for c in chunks:
        hasher.update(c)
    assert hasher.hexdigest() == f"crc32:{zlib.crc32(b''.join(chunks)):08x}"


def test_default_algorithm_falls_back_to_stdlib_without_xxhash(monkeypatch):
    monkeypatch.setitem(sys.modules, "xxhash", None)
    assert tensor_files.default_algorithm() == "crc32"
    assert StreamHasher().hexdigest().startswith("crc32:")


def _header(entries: dict, data_len: int) -> bytes:
    head = json.dumps(entries).encode()
    return len(head).to_bytes(8, "little") + head + b"\0" * data_len


@pytest.mark.parametrize(("data", "match"), [
    (b"\x05\0", "truncated"),
    ((10**9).to_bytes(8, "little") + b"{}", "header length"),
    (_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 4), "invalid"),
    (_header({"a": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}, 4), "invalid"),
    (_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, 8), "overlaps"),
    (_header([1, 2], 0), "not a JSON object"),
])
def test_malformed_safetensors_raise_valueerror(data, match):
    with pytest.raises(ValueError, match=match):
        read_safetensors(io.BytesIO(data), len(data), StreamHasher())


def test_truncated_stream_detected_even_if_size_claims_more():
    data, _ = write(TENSORS)
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(io.BytesIO(data[:-5]), len(data), StreamHasher())


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
