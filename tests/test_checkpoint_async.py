"""Asynchronous checkpoint writes (framework/checkpoint/async_writer.py)."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch

from framework.checkpoint import (
    MODEL,
    TRAINER,
    AsyncCheckpointWriter,
    list_checkpoints,
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


# ---- snapshot overlapping the next step (issue #16) -------------------------------------------------------


def bn_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return model, opt


def clone_tree(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return type(tree)((k, clone_tree(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(clone_tree(v) for v in tree)
    return tree


@pytest.mark.parametrize("reserved", [False, True])
def test_deferred_snapshot_equals_the_step_boundary_bit_for_bit(tmp_path, monkeypatch, reserved):
    """The parameter/optimizer copy is held back until the next step has run forward and backward; the BatchNorm
    statistics that forward changes were copied first, and the step itself waits for the copy — copying what
    the (here: stalled) background thread has not taken, instead of waiting idle."""
    model, opt = bn_state()
    boundary = clone_tree(state_of(model, opt))
    gate, copied_by = threading.Event(), []
    real_copy, real_copy_one = AsyncCheckpointWriter._copy_deferred, AsyncCheckpointWriter._copy_one

    def stalled_copy(self, pending):
        gate.wait(30)
        real_copy(self, pending)

    def recorded_copy_one(self, source, placeholder, devices):
        copied_by.append(threading.current_thread().name)
        real_copy_one(self, source, placeholder, devices)

    monkeypatch.setattr(AsyncCheckpointWriter, "_copy_deferred", stalled_copy)
    monkeypatch.setattr(AsyncCheckpointWriter, "_copy_one", recorded_copy_one)
    writer = AsyncCheckpointWriter()
    if reserved:
        writer.reserve(module=model, optimizers=[opt])
    snap = writer.snapshot(state_of(model, opt), module=model, optimizers=[opt])
    assert writer.busy and not copied_by  # returned before the big copy
    writer.submit(save_checkpoint, str(tmp_path / "c"), snap, {"global_step": 1})
    model(torch.randn(4, 8) * 3).sum().backward()  # next step: BatchNorm statistics change in place
    seen_at_step = []
    opt.register_step_pre_hook(lambda *_: seen_at_step.append(clone_tree(snap)))  # runs after the writer's hook
    opt.step()  # changes every parameter and moment in place: must wait for the copy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # after the step boundary, right away
    gate.set()
    writer.wait()
    assert copied_by and set(copied_by) == {threading.main_thread().name}  # the loop copied it all
    assert_trees_equal(seen_at_step[0][MODEL], boundary[MODEL])  # complete before the step changed anything
    saved_model, saved_trainer = read_state(str(tmp_path / "c"), MODEL), read_state(str(tmp_path / "c"), TRAINER)
    assert_trees_equal(dict(saved_model), dict(boundary[MODEL]))
    assert_trees_equal(saved_trainer["opt"], boundary[TRAINER]["opt"])
    assert not torch.equal(saved_model["1.running_mean"], model[1].running_mean)  # it did change after the save


def test_background_thread_and_loop_share_the_copy_and_its_failure_surfaces_once(tmp_path, monkeypatch):
    """Each tensor is copied by exactly one of the two threads; a failure on either leaves the snapshot
    incomplete, is raised once by the step that waits for it, and the pending write writes nothing."""
    model, opt = bn_state()
    boundary = clone_tree(state_of(model, opt))
    real_copy_one, copied = AsyncCheckpointWriter._copy_one, []

    def slow_copy_one(self, source, placeholder, devices):
        copied.append((threading.current_thread().name, id(source)))
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.05)  # the background thread is slow: the loop takes over the rest
        real_copy_one(self, source, placeholder, devices)

    monkeypatch.setattr(AsyncCheckpointWriter, "_copy_one", slow_copy_one)
    writer = AsyncCheckpointWriter()
    snap = writer.snapshot(state_of(model, opt), module=model, optimizers=[opt])
    time.sleep(0.02)
    writer.wait_for_snapshot()
    threads = {name for name, _ in copied}
    assert threads == {"kiln-checkpoint-snapshot", threading.main_thread().name}
    assert len({ident for _, ident in copied}) == len(copied)  # nothing copied twice
    assert_trees_equal(snap[MODEL], boundary[MODEL])
    assert_trees_equal(snap[TRAINER], boundary[TRAINER])
    writer.wait()

    def failing_copy_one(self, source, placeholder, devices):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(AsyncCheckpointWriter, "_copy_one", failing_copy_one)
    snap = writer.snapshot(state_of(model, opt), module=model, optimizers=[opt])
    writer.submit(save_checkpoint, str(tmp_path / "c"), snap, {"global_step": 1})
    with pytest.raises(RuntimeError, match="copy failed"):
        opt.step()
    with pytest.raises(RuntimeError, match="not written: copying its snapshot failed"):
        writer.wait()  # the write saw the failure too, and wrote nothing
    assert not (tmp_path / "c").exists()
    writer.wait()  # each reported once
    writer.close()


def test_step_hooks_are_removed_and_cost_nothing_after_the_copy():
    model, opt = bn_state()
    writer = AsyncCheckpointWriter()
    writer.snapshot(state_of(model, opt), module=model, optimizers=[opt])
    writer.wait_for_snapshot()
    assert len(opt._optimizer_step_pre_hooks) == 1
    opt.step()  # the hook finds nothing pending
    writer.wait()
    assert len(opt._optimizer_step_pre_hooks) == 0


def test_snapshot_buffers_are_allocated_by_the_background_copy_and_reused():
    """The first snapshot allocates its buffers on the copier thread (not in the loop); later ones reuse them."""
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = AsyncCheckpointWriter()
    snap = writer.snapshot({"m": model.state_dict()}, module=model, optimizers=[opt])
    writer.wait_for_snapshot()
    assert torch.equal(snap["m"]["weight"], model.weight) and snap["m"]["weight"].data_ptr() != model.weight.data_ptr()
    again = writer.snapshot({"m": model.state_dict()}, module=model, optimizers=[opt])
    writer.wait_for_snapshot()
    assert again["m"]["weight"].data_ptr() == snap["m"]["weight"].data_ptr()  # reused


def test_reserved_buffers_are_warm_and_taken_by_the_first_snapshot():
    """reserve() allocates and touches the buffers off the loop; the first snapshot copies into exactly those."""
    model, opt = bn_state()
    writer = AsyncCheckpointWriter()
    writer.reserve(module=model, optimizers=[opt])
    writer._reserver.join()
    reserved = {t.data_ptr() for t in writer._reserved.values()}
    expected = [*model.parameters(), *model.buffers()] + [v for s in opt.state.values() for v in s.values()]
    assert len(reserved) == len({t.data_ptr() for t in expected if t.numel()})
    snap = writer.snapshot(state_of(model, opt), module=model, optimizers=[opt])
    writer.wait_for_snapshot()
    taken = [t for t in [*snap[MODEL].values(), *[v for s in snap[TRAINER]["opt"]["state"].values() for v in s.values()]]
             if t.numel()]
    assert {t.data_ptr() for t in taken} == reserved  # no fresh allocation left for the first save
    assert_trees_equal(dict(snap[MODEL]), dict(model.state_dict()))
    writer.close()


def test_trainer_async_checkpoints_hold_the_step_boundary_state(tmp_path):
    from callbacks import Callback, ModelCheckpoint
    from framework import Trainer, TrainModule

    class Net(TrainModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    class Record(Callback):
        def __init__(self):
            self.states = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.states[trainer.global_step] = clone_tree(module.state_dict())

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 4)), batch_size=4)
    record = Record()
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      callbacks=[record, ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=1,
                                                         save_top_k=-1, async_save=True)])
    trainer.fit(Net(), data)
    saved = {m.global_step: m.path for m in list_checkpoints(str(tmp_path / "checkpoints"))}
    assert sorted(saved) == list(range(1, 7))
    for step, path in saved.items():
        assert_trees_equal(dict(read_state(path, MODEL)), dict(record.states[step]))


def test_model_checkpoint_reserves_the_snapshot_buffers_once_after_the_first_step(tmp_path, monkeypatch):
    """ModelCheckpoint(async_save=True) calls AsyncCheckpointWriter.reserve once the optimizer state exists, so
    the first background save copies into warm buffers like every later one."""
    from callbacks import ModelCheckpoint
    from framework import Trainer, TrainModule
    from framework.checkpoint import AsyncCheckpointWriter

    calls = []
    reserve = AsyncCheckpointWriter.reserve

    def recording_reserve(self, *, module=None, optimizers=()):
        optimizers = list(optimizers)
        calls.append((module, [len(opt.state) for opt in optimizers]))
        return reserve(self, module=module, optimizers=optimizers)

    monkeypatch.setattr(AsyncCheckpointWriter, "reserve", recording_reserve)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4))

    class Net(TrainModule):
        def __init__(self):
            super().__init__()
            self.net = module

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    net = Net()
    trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                      callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=2,
                                                 save_top_k=-1, async_save=True)])
    trainer.fit(net, data)
    assert len(calls) == 1
    reserved_module, optimizer_state_sizes = calls[0]
    assert reserved_module is net and optimizer_state_sizes == [2]  # AdamW state for the weight and the bias
    assert len(list_checkpoints(str(tmp_path / "checkpoints"))) == 4
