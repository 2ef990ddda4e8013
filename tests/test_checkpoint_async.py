"""Asynchronous checkpoint writes (framework/checkpoint/async_writer.py)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch

from framework.checkpoint import (
    MODEL,
    TRAINER,
    AsyncCheckpointWriter,
    read_manifest,
    read_state,
    save_checkpoint,
)


def live_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def state_of(model, opt):
    return {MODEL: model.state_dict(), TRAINER: {"opt": opt.state_dict(), "np": np.arange(3), "t": (1, 2)}}


def file_checksums(path):
    return {rel: e["checksum"] for rel, e in read_manifest(path).files.items()}


@pytest.mark.parametrize("safe", [True, False])
def test_async_save_equals_sync_save(tmp_path, safe):
    model, opt = live_state()
    sync = save_checkpoint(str(tmp_path / "sync"), state_of(model, opt), {"global_step": 1}, safe_serialization=safe)
    with AsyncCheckpointWriter() as writer:
        snap = writer.snapshot(state_of(model, opt))
        writer.submit(save_checkpoint, str(tmp_path / "async"), snap, {"global_step": 1}, safe_serialization=safe)
    if safe:  # byte-identical files (torch.save zips are not byte-stable, so compare content there)
        assert file_checksums(str(tmp_path / "async")) == file_checksums(sync)
    for name in (MODEL, TRAINER):
        a, b = read_state(sync, name), read_state(str(tmp_path / "async"), name)
        assert_trees_equal(a, b)


def assert_trees_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b) and all(assert_trees_equal(a[k], b[k]) is None for k in a)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b) and all(assert_trees_equal(x, y) is None for x, y in zip(a, b))
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    else:
        assert a == b


def test_snapshot_is_decoupled_from_later_training(tmp_path):
    model, opt = live_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    writer = AsyncCheckpointWriter()
    snap = writer.snapshot(state_of(model, opt))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # mutates parameters and the optimizer's inner per-param dicts in place
    opt.state[model[0].bias]["extra"] = 1
    writer.submit(save_checkpoint, str(tmp_path / "c"), snap)
    writer.wait()
    saved = read_state(str(tmp_path / "c"), MODEL)
    assert all(torch.equal(saved[k], v) for k, v in before.items())
    assert "extra" not in read_state(str(tmp_path / "c"), TRAINER)["opt"]["state"][1]
    assert saved["0.weight"] is saved["1.weight"]


def test_snapshot_keeps_types_ties_and_reuses_buffers():
    model, opt = live_state()
    writer = AsyncCheckpointWriter()
    first = writer.snapshot(state_of(model, opt))
    assert type(first[MODEL]) is OrderedDict and first[MODEL]._metadata == model.state_dict()._metadata
    assert first[MODEL]["0.weight"] is first[MODEL]["1.weight"]
    assert first[TRAINER]["t"] == (1, 2) and first[MODEL]["0.weight"].data_ptr() != model[0].weight.data_ptr()
    ptr = first[MODEL]["0.bias"].data_ptr()
    second = writer.snapshot(state_of(model, opt))
    assert second[MODEL]["0.bias"].data_ptr() == ptr  # reused, no fresh allocation
    writer.close()
    assert AsyncCheckpointWriter(reuse_buffers=False).snapshot({"b": model[0].bias})["b"].data_ptr() != ptr


def test_snapshot_and_submit_wait_for_the_running_write():
    writer = AsyncCheckpointWriter()
    release, order = threading.Event(), []

    def slow_write():
        release.wait(10)
        order.append("write")

    writer.submit(slow_write)
    assert writer.busy
    threading.Timer(0.2, release.set).start()
    writer.snapshot({"x": torch.ones(2)})  # must not overwrite buffers the write still reads
    order.append("snapshot")
    assert order == ["write", "snapshot"] and not writer.busy


def test_failure_surfaces_at_wait_once():
    writer = AsyncCheckpointWriter()
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.wait()
    writer.wait()  # reported once


def test_failure_surfaces_at_next_submit(tmp_path):
    writer = AsyncCheckpointWriter()
    writer.submit(save_checkpoint, str(tmp_path / "bad"), {TRAINER: {"cb": object()}})
    with pytest.raises(TypeError, match=r"state\['cb'\]"):
        writer.submit(save_checkpoint, str(tmp_path / "good"), {MODEL: {}})
    assert not os.path.exists(tmp_path / "good") and not os.path.exists(tmp_path / "bad")
