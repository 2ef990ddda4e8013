"""Storage faults while checkpointing through the Trainer: a full disk, a permission error, a failing object
store, at every point of a save (state file, skeleton, manifest, commit rename, directory creation), written
synchronously or in the background.

Whatever fails, the error is the storage's own (its type unchanged) with a note naming the checkpoint that was
not written; every earlier checkpoint still verifies (sizes and checksums against its manifest); nothing
incomplete is visible, so ``ckpt_path="last"`` takes the previous checkpoint; and leftovers are removed when
the next fit starts. A process killed mid-save is tests/test_fault_injection.py's case.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
import warnings
from typing import Any

import fsspec
import pytest
import torch

from callbacks import ModelCheckpoint
from framework import checkpoint
from framework.checkpoint import (
    CheckpointDamaged,
    begin_checkpoint,
    cleanup_stale,
    commit_checkpoint,
    find_last,
    list_checkpoints,
    tensor_files,
    verify_checkpoint,
    write_state,
)
from framework.checkpoint import save as checkpoint_save
from framework.checkpoint.owner import OWNER_PREFIX, owner_record
from framework.checkpoint.storage import Location

FAILING_SAVE = 4  # saves every step; the 4th one fails (rotation keeps 2)


class Failure:
    """Makes the ``FAILING_SAVE``-th save fail at ``where`` with ``error``; counts saves via begin_checkpoint."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, where: str, error: BaseException) -> None:
        self.where, self.error, self.saves, self.raised = where, error, 0, False
        real_begin = checkpoint.begin_checkpoint

        def begin(path: str, token: Any = None) -> Any:
            self.saves += 1
            if self.armed and where == "mkdir":
                self.fire()
            return real_begin(path, token)

        monkeypatch.setattr(checkpoint, "begin_checkpoint", begin)
        real_tensors = tensor_files.write_safetensors
        monkeypatch.setattr(tensor_files, "write_safetensors", lambda loc, tensors, **kwargs: (
            self.fire(loc) if self.armed and where == "state" else real_tensors(loc, tensors, **kwargs)))
        real_write_file = checkpoint_save.write_file

        def write_file(loc: Location, write: Any, fsync: bool = False) -> Any:
            target = {"manifest.json": "manifest"}.get(loc.name, "skeleton" if loc.name.endswith(".json") else "")
            if self.armed and where == target:
                self.fire()
            return real_write_file(loc, write, fsync)

        monkeypatch.setattr(checkpoint_save, "write_file", write_file)
        real_replace = Location.replace_with
        monkeypatch.setattr(Location, "replace_with", lambda loc, staging, token, fsync=False: (
            self.fire() if self.armed and where == "rename" else real_replace(loc, staging, token, fsync)))

    @property
    def armed(self) -> bool:
        return self.saves == FAILING_SAVE and not self.raised

    def fire(self, loc: Location | None = None) -> None:
        if loc is not None:
            with loc.open("wb") as f:
                f.write(b"partial")
        self.raised = True
        raise self.error


def every_step(**kwargs: Any) -> ModelCheckpoint:
    callback = ModelCheckpoint(**{"every_n_train_steps": 1, "save_top_k": -1, "filename": "step={step}",
                                  "auto_insert_metric_name": False, "total_limit": 2, **kwargs})
    callback.FILE_EXTENSION = ""  # plain "step=N" directory names (Lightning's documented customisation)
    return callback


def visible(dirpath: str) -> list[str]:
    return sorted(n for n in os.listdir(dirpath) if not n.startswith("."))


def names(dirpath: str) -> list[str]:
    return sorted(os.path.basename(m.path.rstrip("/")) for m in list_checkpoints(dirpath))


ERRORS = {  # factories: an exception raised once carries its notes along
    "ENOSPC": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "EACCES": lambda: PermissionError(errno.EACCES, "Permission denied"),
    "EIO": lambda: OSError(errno.EIO, "Input/output error"),
}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("where, error", [("state", "ENOSPC"), ("skeleton", "ENOSPC"), ("manifest", "ENOSPC"),
                                          ("rename", "EIO"), ("mkdir", "EACCES"), ("state", "EACCES")])
def test_a_failed_save_raises_clearly_and_leaves_earlier_checkpoints_intact(
        make_trainer, tiny_module_cls, make_loader, tmp_path, monkeypatch, where, error, async_save):
    failure = Failure(monkeypatch, where, ERRORS[error]())
    trainer = make_trainer(enable_checkpointing=True, callbacks=[every_step(async_save=async_save)], max_epochs=2)
    with pytest.raises(type(failure.error)) as info:
        trainer.fit(tiny_module_cls(), make_loader())
    assert failure.raised and info.value is failure.error
    note = "".join(getattr(info.value, "__notes__", []))
    dirpath = str(tmp_path / "checkpoints")
    assert f"saving checkpoint {os.path.join(dirpath, 'step=4')} failed" in note and "earlier checkpoints" in note
    if async_save:  # surfaced at the next save (step 5), which then did not start
        assert trainer.global_step == FAILING_SAVE + 1
    monkeypatch.undo()

    assert names(dirpath) == ["step=2", "step=3"] == visible(dirpath)
    for name in names(dirpath):
        manifest = verify_checkpoint(os.path.join(dirpath, name))
        assert sorted([*manifest.files, "manifest.json"]) == sorted(os.listdir(os.path.join(dirpath, name)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing damaged or incomplete is even looked at
        assert find_last(dirpath) == os.path.join(dirpath, "step=3")

    resumed = make_trainer(enable_checkpointing=True, callbacks=[every_step()], max_epochs=2)
    resumed.fit(tiny_module_cls(), make_loader(), ckpt_path="last")  # fit start removes hidden leftovers
    assert resumed.global_step == 10 and sorted(os.listdir(dirpath)) == ["step=10", "step=9"]


@pytest.fixture
def memory_root():
    root = f"/kiln-faults-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_an_object_store_error_leaves_earlier_remote_checkpoints_intact(make_trainer, tiny_module_cls, make_loader,
                                                                        monkeypatch, memory_root):
    from fsspec.implementations.memory import MemoryFileSystem

    real_open, opened = MemoryFileSystem._open, {"writes": 0}

    def flaky_open(self, path, mode="rb", **kwargs):
        if "w" in mode and path.endswith(".safetensors"):
            opened["writes"] += 1
            if opened["writes"] == 3 * FAILING_SAVE - 1:  # a state file of the 4th save (3 per save)
                raise OSError(errno.EIO, "simulated 503 from the object store")
        return real_open(self, path, mode, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", flaky_open)
    dirpath = f"memory://{memory_root}/checkpoints"
    trainer = make_trainer(enable_checkpointing=True, default_root_dir=f"memory://{memory_root}",
                           callbacks=[every_step()], max_epochs=2)
    with pytest.raises(OSError, match="simulated 503") as info:
        trainer.fit(tiny_module_cls(), make_loader())
    assert "saving checkpoint memory://" in "".join(info.value.__notes__)
    monkeypatch.undo()

    fs = fsspec.filesystem("memory")
    listed = fs.ls(f"{memory_root}/checkpoints", detail=False)
    assert sorted(p.rsplit("/", 1)[-1] for p in listed) == ["step=2", "step=3"]
    for path in (f"{dirpath}/step=2", f"{dirpath}/step=3"):
        verify_checkpoint(path)
    assert find_last(dirpath) == f"{dirpath}/step=3"


def test_a_remote_save_cut_short_is_ignored_then_removed_when_fit_starts(make_trainer, tiny_module_cls, make_loader,
                                                                         memory_root):
    """Object stores have no atomic rename: a killed save leaves files in place, marked pending until commit."""
    dirpath = f"memory://{memory_root}/checkpoints"
    weights = {"w": tiny_module_cls().layer.weight.detach()}
    done = begin_checkpoint(f"{dirpath}/marked")  # killed after its manifest, before removing the mark
    commit_checkpoint(done, write_state(done, "model", weights), {"global_step": 1})
    fsspec.filesystem("memory").pipe(f"{memory_root}/checkpoints/marked/.kiln-pending", b"")
    make_trainer(enable_checkpointing=True, default_root_dir=f"memory://{memory_root}",
                 callbacks=[every_step(total_limit=None)], max_epochs=1).fit(tiny_module_cls(), make_loader())
    cut = begin_checkpoint(f"{dirpath}/step=99")  # a save in flight (this process is its writer)
    write_state(cut, "model", weights)

    with pytest.warns(UserWarning, match=r"skipping damaged or incomplete checkpoint .*step=99"):
        assert find_last(dirpath) == f"{dirpath}/step=5"
    assert cleanup_stale(dirpath, max_age_s=0) == []  # its writer runs: never removed, whatever its age
    fs = fsspec.filesystem("memory")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for file in fs.ls(f"{memory_root}/checkpoints/step=99", detail=False):  # now: a save whose process was killed
        if file.rsplit("/", 1)[-1].startswith(OWNER_PREFIX):
            fs.pipe(file, owner_record(dead.pid))
    resumed = make_trainer(enable_checkpointing=True, default_root_dir=f"memory://{memory_root}",
                           callbacks=[every_step(total_limit=None)], max_epochs=2)
    resumed.fit(tiny_module_cls(), make_loader(), ckpt_path="last")  # its start removes the cut-short save
    fs = fsspec.filesystem("memory")
    left = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{memory_root}/checkpoints", detail=False)}
    assert "step=99" not in left and {"marked", "step=5", "step=10"} <= left, left
    assert resumed.global_step == 10


# ---- damage found only when loading: "last" goes back to the previous checkpoint -------------------------------


def flip_byte(path: str, offset: int = -1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("rel", ["model.safetensors", "trainer.json", "rank-0.safetensors"])
def test_last_skips_a_checkpoint_whose_content_is_damaged(make_trainer, tiny_module_cls, make_loader, tmp_path, rel):
    dirpath = str(tmp_path / "checkpoints")
    make_trainer(enable_checkpointing=True, callbacks=[every_step()], max_epochs=1).fit(tiny_module_cls(),
                                                                                       make_loader())
    flip_byte(os.path.join(dirpath, "step=5", rel))  # same size: only its checksum tells
    reference = make_trainer(enable_checkpointing=True, callbacks=[every_step(dirpath=str(tmp_path / "ref"))],
                             max_epochs=2)
    reference_module = tiny_module_cls()
    reference.fit(reference_module, make_loader(), ckpt_path=os.path.join(dirpath, "step=4"))

    resumed, module = make_trainer(enable_checkpointing=True, callbacks=[every_step()], max_epochs=2), \
        tiny_module_cls()
    with pytest.warns(UserWarning, match=rf'ckpt_path="last": skipping damaged checkpoint .*step=5: file {rel}'):
        resumed.fit(module, make_loader(), ckpt_path="last")
    assert resumed.global_step == 10
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), reference_module.state_dict().values()))


def test_last_raises_when_every_checkpoint_is_damaged(make_trainer, tiny_module_cls, make_loader, tmp_path):
    dirpath = str(tmp_path / "checkpoints")
    make_trainer(enable_checkpointing=True, callbacks=[every_step()], max_epochs=1).fit(tiny_module_cls(),
                                                                                       make_loader())
    for name in ("step=4", "step=5"):
        flip_byte(os.path.join(dirpath, name, "model.safetensors"))
    trainer = make_trainer(enable_checkpointing=True, callbacks=[every_step()], max_epochs=2)
    with pytest.warns(UserWarning, match="skipping damaged"), pytest.raises(CheckpointDamaged, match="step=4"):
        trainer.fit(tiny_module_cls(), make_loader(), ckpt_path="last")
