"""Reading untrusted checkpoints fails closed (framework/checkpoint/load.py, issue #14 holes 3-6).

Every case is a CheckpointError naming the checkpoint and the file, raised before anything large is
allocated or anything could block; ``"last"`` skips what is damaged and goes back to the intact one.
"""

from __future__ import annotations

import json
import os
import threading
import warnings

import pytest
import torch

from framework.checkpoint import (
    MANIFEST,
    MODEL,
    CheckpointDamaged,
    CheckpointError,
    find_last,
    read_manifest,
    read_state,
    save_checkpoint,
)
from framework.checkpoint.format import manifest_checksum


def save(path, step):
    return save_checkpoint(str(path), {MODEL: {"w": torch.arange(6.0) + step}}, {"global_step": step})


def within(seconds, fn, *args):
    """Run ``fn`` and return (result or exception); fail if it blocks (a FIFO opened for reading would)."""
    box = {}

    def run():
        try:
            box["out"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["out"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} blocked for {seconds}s"
    return box["out"]


def rewrite_manifest(path, **changes):
    file = os.path.join(path, MANIFEST)
    doc = json.load(open(file))
    doc.pop("checksum")
    doc.update(changes)
    doc["checksum"] = manifest_checksum(doc, "xxh3_64")  # consistent: only the content is hostile
    with open(file, "w") as f:
        f.write(json.dumps(doc).replace('"__INF__"', "1e400"))


@pytest.mark.parametrize("which", [MANIFEST, "model.safetensors", "model.json"])
def test_fifo_in_place_of_a_file_is_refused_without_blocking_and_last_skips_it(tmp_path, which):
    older, newer = save(tmp_path / "a", 1), save(tmp_path / "b", 2)
    os.utime(newer, (os.path.getmtime(older) + 10,) * 2)
    target = os.path.join(newer, which)
    os.remove(target)
    os.mkfifo(target)
    error = within(20, read_state, newer, MODEL)
    assert isinstance(error, CheckpointDamaged) and "not a regular file" in str(error) and newer in str(error)
    with pytest.warns(UserWarning, match="skipping damaged or incomplete"):
        assert within(20, find_last, str(tmp_path)) == older


@pytest.mark.parametrize("changes", [{"world_size": "__INF__"}, {"world_size": 0}, {"world_size": 2.5},
                                     {"created": "__INF__"}, {"metadata": [1]}, {"files": [7]},
                                     {"files": [{"path": "x", "size": "__INF__", "checksum": "xxh3_64:00"}]}])
def test_any_manifest_parse_error_is_a_checkpoint_error_and_last_falls_back(tmp_path, changes):
    older, newer = save(tmp_path / "a", 1), save(tmp_path / "b", 2)
    rewrite_manifest(newer, **changes)
    with pytest.raises(CheckpointError, match=r"checkpoint .*b: manifest.json is invalid"):
        read_manifest(newer)
    with pytest.warns(UserWarning, match="skipping damaged or incomplete"):
        assert find_last(str(tmp_path)) == older


def _hostile_safetensors(path, header: dict, data_len: int):
    """Replace model.safetensors with a crafted file and make the manifest agree with it (size, checksum)."""
    import xxhash

    head = json.dumps(header).encode()
    data = len(head).to_bytes(8, "little") + head + b"\0" * data_len
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(data)
    doc = json.load(open(os.path.join(path, MANIFEST)))
    for entry in doc["files"]:
        if entry["path"] == "model.safetensors":
            entry.update(size=len(data), checksum=f"xxh3_64:{xxhash.xxh3_64(data).hexdigest()}")
    rewrite_manifest(path, files=doc["files"])


@pytest.mark.parametrize(("header", "data_len", "match"), [
    ({"w": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, 0, "no tensor can have"),
    ({"w": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 16]}}, 16, "overflow"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 32, "not fully covered"),
])
def test_malformed_safetensors_header_is_a_checkpoint_error_naming_the_file(tmp_path, header, data_len, match):
    path = save(tmp_path / "c", 1)
    _hostile_safetensors(path, header, data_len)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: file model.safetensors .*{match}"):
        read_state(path, MODEL)


def test_huge_sparse_file_is_refused_before_anything_is_allocated(tmp_path):
    path = save(tmp_path / "c", 1)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.truncate(2**40)  # 1 TiB, sparse: the manifest's size tells it apart at once
    with pytest.raises(CheckpointDamaged, match="model.safetensors is damaged: it has 1099511627776 bytes"):
        raise within(20, read_state, path, MODEL)


def test_tensors_larger_than_memory_are_refused_even_when_the_manifest_agrees(tmp_path):
    path = save(tmp_path / "c", 1)
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + 2**20
    _hostile_safetensors(path, {"w": {"dtype": "U8", "shape": [total], "data_offsets": [0, total]}}, 0)
    # the file's declared data is absent, so the library refuses it as not covering the header; with the
    # data present (sparse), the memory check refuses it before the allocation:
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) + total)
    doc = json.load(open(os.path.join(path, MANIFEST)))
    for entry in doc["files"]:
        if entry["path"] == "model.safetensors":
            entry["size"] = os.path.getsize(file)
    rewrite_manifest(path, files=doc["files"])
    error = within(30, read_state, path, MODEL)
    assert isinstance(error, CheckpointError) and "more than this machine's" in str(error), error


@pytest.mark.parametrize("where", ["a file", MANIFEST])
def test_ckpt_path_at_a_file_says_it_must_be_a_checkpoint_directory(tmp_path, where, make_trainer, tiny_module_cls,
                                                                    make_loader):
    path = save(tmp_path / "c", 1)
    target = os.path.join(path, MANIFEST) if where == MANIFEST else str(tmp_path / "weights.bin")
    if where != MANIFEST:
        open(target, "wb").write(b"\0" * 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="it is a file, but a Kiln checkpoint is a directory") as info:
            make_trainer().fit(tiny_module_cls(), make_loader(), ckpt_path=target)
    assert not isinstance(info.value, CheckpointDamaged) and "damaged" not in str(info.value)
    if where == MANIFEST:
        assert f"pass the folder that holds it: {path}" in str(info.value)
    else:  # a Lightning .ckpt file, most likely: say how to read its weights
        assert "torch.load(path, weights_only=True)['state_dict']" in str(info.value)
