"""Security: a checkpoint folder is untrusted input, and URLs may carry credentials.

- No code runs from a checkpoint: a pickle holding code in any ``.pt`` state (trainer, per-rank — the model's
  is tests/test_checkpoint_trainer.py's case), crafted JSON skeletons and manifests are refused as data.
- Nothing outside the checkpoint directory is read or deleted: manifest paths that climb out, symbolic links
  inside a checkpoint or in the checkpoint folder.
- Credentials in ``memory://user:secret@...`` and ``s3://key:secret@...`` URLs never appear in a warning, a
  log record, the terminal, or an exception raised through the Trainer (notes and chained causes included).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import traceback
import uuid
import warnings

import fsspec
import pytest
import torch

from callbacks import Callback, ModelCheckpoint
from framework.checkpoint import (
    CheckpointError,
    begin_checkpoint,
    commit_checkpoint,
    describe_files,
    list_checkpoints,
    read_manifest,
    tensor_files,
)

SECRET = "TOPSECRET9"


def every_step(**kwargs):
    callback = ModelCheckpoint(**{"every_n_train_steps": 1, "save_top_k": -1, "filename": "step={step}",
                                  "auto_insert_metric_name": False, **kwargs})
    callback.FILE_EXTENSION = ""  # plain "step=N" directory names (Lightning's documented customisation)
    return callback


@pytest.fixture
def trained(make_trainer, tiny_module_cls, make_loader, tmp_path):
    """A checkpoint folder of a 5-step run in pickle format (``.pt`` states), and a fit function resuming it."""

    def fit(ckpt_path, **kwargs):
        trainer = make_trainer(enable_checkpointing=True, callbacks=[every_step(safe_serialization=False)],
                               max_epochs=2, **kwargs)
        trainer.fit(tiny_module_cls(), make_loader(), ckpt_path=ckpt_path)
        return trainer

    fit(None)
    return str(tmp_path / "checkpoints"), fit


def rebuild(good: str, evil: str, replace: dict[str, bytes], extra: list[str] = ()) -> None:
    """Checkpoint ``good`` copied to ``evil`` with files replaced, listed with correct sizes and checksums (what an
    attacker with write access to the folder can do)."""
    staging = begin_checkpoint(evil)
    names = [n for n in os.listdir(good) if n != "manifest.json"]
    for name in names:
        shutil.copy(os.path.join(good, name), os.path.join(staging.dir, name))
    for name, data in replace.items():
        with open(os.path.join(staging.dir, name), "wb") as f:
            f.write(data)
    commit_checkpoint(staging, describe_files(staging, sorted({*names, *replace, *extra})), {"global_step": 99})


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(marker: str) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"format": "kiln-tree", "tree": Exploit(marker), "tensors": {}}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["trainer.pt", "rank-0.pt"])
@pytest.mark.parametrize("how", ["path", "last"])
def test_code_in_a_pickled_state_is_never_run(trained, tmp_path, name, how):
    dirpath, fit = trained
    marker = str(tmp_path / "pwned")
    evil = os.path.join(dirpath, "step=99")
    rebuild(os.path.join(dirpath, "step=5"), evil, {name: malicious_pickle(marker)})
    assert read_manifest(evil).files[name]["size"] > 0  # listed, checksum and all
    # an intact file that must not be loaded is an error, also for "last" (only damaged ones are skipped)
    with pytest.raises(CheckpointError, match=rf"step=99.*{name.replace('.', '[.]')}.*unpickle"):
        fit(evil if how == "path" else "last")
    assert not os.path.exists(marker)


@pytest.mark.parametrize("skeleton", [
    {"format": "kiln-tree", "version": 1, "tree": {"__kiln__": "dtype", "name": "load"}},
    {"format": "kiln-tree", "version": 1, "tree": {"__kiln__": "ndarray", "dtype": "|O", "shape": [1], "key": "x"}},
    {"format": "kiln-tree", "version": 1, "tree": {"__kiln__": "npscalar", "dtype": "|O", "hex": "00" * 8}},
    {"format": "kiln-tree", "version": 1, "tree": {"__kiln__": "import", "module": "os", "name": "system"}},
    "deep",
])
def test_crafted_skeletons_are_refused_as_data(tmp_path, make_trainer, tiny_module_cls, make_loader, skeleton):
    trainer = make_trainer(enable_checkpointing=True, callbacks=[every_step()], max_epochs=1)
    trainer.fit(tiny_module_cls(), make_loader())
    dirpath = str(tmp_path / "checkpoints")
    data = ("[" * 100_000 + "]" * 100_000 if skeleton == "deep" else json.dumps(skeleton)).encode()
    if skeleton == "deep":
        data = b'{"format": "kiln-tree", "version": 1, "tree": ' + data + b"}"
    evil = os.path.join(dirpath, "step=99")
    rebuild(os.path.join(dirpath, "step=5"), evil, {"trainer.json": data})
    with pytest.raises(CheckpointError, match=r"step=99.*trainer\.json"):
        make_trainer(max_epochs=2).fit(tiny_module_cls(), make_loader(), ckpt_path=evil)


def test_a_deeply_nested_manifest_is_refused(tmp_path, make_trainer, tiny_module_cls, make_loader):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="manifest.json is invalid"):
        make_trainer().fit(tiny_module_cls(), make_loader(), ckpt_path=str(path))


def test_a_manifest_path_that_climbs_out_is_refused_and_passed_over_by_last(trained, tmp_path):
    """(Every form of such a path is tests/test_checkpoint.py's; here through the Trainer.)"""
    from framework.checkpoint.format import manifest_checksum

    dirpath, fit = trained
    (tmp_path / "victim.pt").write_bytes(b"x")
    evil = os.path.join(dirpath, "step=99")
    shutil.copytree(os.path.join(dirpath, "step=5"), evil)
    with open(os.path.join(evil, "manifest.json")) as f:
        doc = json.load(f)
    del doc["checksum"]
    doc["files"].append({"path": "../../victim.pt", "size": 1, "checksum": doc["files"][0]["checksum"]})
    doc["checksum"] = manifest_checksum(doc, tensor_files.default_algorithm())  # consistent, just hostile
    with open(os.path.join(evil, "manifest.json"), "w") as f:
        json.dump(doc, f)
    with pytest.raises(CheckpointError, match=r"step=99.*unsafe"):
        fit(evil)
    with pytest.warns(UserWarning, match=r"skipping damaged or incomplete checkpoint .*step=99"):
        assert fit("last").global_step == 10


def test_a_symbolic_link_out_of_the_checkpoint_is_not_followed(trained, tmp_path):
    dirpath, fit = trained
    outside = tmp_path / "elsewhere.pt"
    shutil.copy(os.path.join(dirpath, "step=4", "model.pt"), outside)  # a valid file
    good, evil = os.path.join(dirpath, "step=5"), os.path.join(dirpath, "step=99")
    staging = begin_checkpoint(evil)
    names = [n for n in os.listdir(good) if n not in ("manifest.json", "model.pt")]
    for name in names:
        shutil.copy(os.path.join(good, name), os.path.join(staging.dir, name))
    os.symlink(outside, os.path.join(staging.dir, "model.pt"))
    # listed with the size and checksum of what the link points to
    commit_checkpoint(staging, describe_files(staging, [*names, "model.pt"]), {"global_step": 99})
    assert os.path.islink(os.path.join(evil, "model.pt"))
    with pytest.raises(CheckpointError, match=r"model\.pt resolves to a place outside the checkpoint directory"):
        fit(evil)


def test_links_in_the_checkpoint_folder_never_lead_deletion_outside(make_trainer, tiny_module_cls, make_loader,
                                                                     tmp_path):
    dirpath = tmp_path / "checkpoints"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    dirpath.mkdir()
    os.symlink(victim, dirpath / ".step=1.tmp-0123abcd")  # named like a save's staging dir
    os.symlink(victim, dirpath / ".step=2.old-4567ef")  # and like a deletion's leftover
    trainer = make_trainer(enable_checkpointing=True, callbacks=[every_step(total_limit=1)], max_epochs=1)
    trainer.fit(tiny_module_cls(), make_loader())  # fit start cleans leftovers; rotation deletes 4 checkpoints
    assert (victim / "precious.txt").read_text() == "keep me"
    assert [m.path for m in list_checkpoints(str(dirpath))] == [str(dirpath / "step=5")]


def test_rotating_a_linked_checkpoint_removes_the_link_not_its_target(make_trainer, tiny_module_cls, make_loader,
                                                                      tmp_path):
    make_trainer(enable_checkpointing=True, callbacks=[every_step(dirpath=str(tmp_path / "kept"))],
                 max_epochs=1).fit(tiny_module_cls(), make_loader())
    dirpath = tmp_path / "checkpoints"
    dirpath.mkdir()
    os.symlink(tmp_path / "kept" / "step=1", dirpath / "step=1")  # e.g. a user linking a checkpoint in
    make_trainer(enable_checkpointing=True, callbacks=[every_step(total_limit=2)], max_epochs=1).fit(
        tiny_module_cls(), make_loader())
    assert not os.path.lexists(dirpath / "step=1")
    assert read_manifest(str(tmp_path / "kept" / "step=1")).global_step == 1  # the target is untouched


# ---- credentials in URLs ---------------------------------------------------------------------------------------


class Capture:
    """Everything a user could see: warnings, log records, and (through capfd) the terminal."""

    def __init__(self, caplog) -> None:
        self.texts: list[str] = []
        self.caplog = caplog

    def run(self, fn, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:  # inspected below: message, notes, causes, traceback
                self.texts.append("".join(traceback.format_exception(exc)))
                return exc
            finally:
                self.texts.extend(str(w.message) for w in caught)

    def assert_clean(self, capfd) -> None:
        out, err = capfd.readouterr()
        seen = "\n".join([*self.texts, *(r.getMessage() for r in self.caplog.records), out, err])
        assert SECRET not in seen, seen[max(0, seen.find(SECRET) - 300):seen.find(SECRET) + 100]


def test_memory_url_credentials_never_show(make_trainer, tiny_module_cls, make_loader, monkeypatch, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    bucket = f"kiln-{uuid.uuid4().hex[:8]}"
    root = f"memory://user:{SECRET}@{bucket}/run"
    capture = Capture(caplog)

    class Terminate(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                signal.raise_signal(signal.SIGTERM)

    def fit(*callbacks, ckpt_path=None, module=None, **kwargs):
        trainer = make_trainer(default_root_dir=root, enable_checkpointing=True, logger=True, max_epochs=2,
                               callbacks=[every_step(total_limit=2), *callbacks], **kwargs)
        trainer.fit(module or tiny_module_cls(), make_loader(), make_loader(8), ckpt_path=ckpt_path)
        return trainer

    # "last" with nothing there, then a preemption that saves and says where
    assert capture.run(fit, Terminate(), ckpt_path="last").code == 75
    # "last" with the newest checkpoint damaged: skipped with a warning naming it
    fs = fsspec.filesystem("memory")
    newest = f"/{bucket}/run/checkpoints/step=3/model.safetensors"
    data = bytearray(fs.cat_file(newest))
    data[-1] ^= 0xFF
    fs.pipe(newest, bytes(data))
    assert capture.run(fit, ckpt_path="last").global_step == 10
    # a checkpoint that does not exist, a save that fails, a non-finite loss that stops training
    assert isinstance(capture.run(fit, ckpt_path=f"{root}/checkpoints/nope"), CheckpointError)
    real_write = tensor_files.write_safetensors
    monkeypatch.setattr(tensor_files, "write_safetensors", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    assert isinstance(capture.run(fit), OSError)
    monkeypatch.setattr(tensor_files, "write_safetensors", real_write)

    class NanModule(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("nan")

    assert isinstance(capture.run(fit, module=NanModule(), nan_policy="stop"), RuntimeError)
    assert len(capture.texts) >= 6
    capture.assert_clean(capfd)


@pytest.mark.timeout(180)
def test_s3_url_credentials_never_show(moto_endpoint, make_trainer, tiny_module_cls, make_loader, monkeypatch, capfd,
                                       caplog):
    import s3fs

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"kiln-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(key="AKIAKILN", secret=SECRET).mkdir(bucket)
    capture = Capture(caplog)

    def fit(root, ckpt_path=None):
        trainer = make_trainer(default_root_dir=root, enable_checkpointing=True, max_epochs=1,
                               callbacks=[every_step(total_limit=2)])
        trainer.fit(tiny_module_cls(), make_loader(), ckpt_path=ckpt_path)
        return trainer

    try:
        root = f"s3://AKIAKILN:{SECRET}@{bucket}/run"
        assert capture.run(fit, root, ckpt_path="last").global_step == 5
        assert capture.run(fit, root, ckpt_path="last").global_step == 5  # resumed at the end: nothing to do
        error = capture.run(fit, root, ckpt_path=f"{root}/checkpoints/nope")
        assert isinstance(error, CheckpointError) and "***@" in str(error), error
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    capture.assert_clean(capfd)
