"""Checkpoints through the Trainer: both formats and cross-loading, tied weights, integrity (truncation,
flipped bytes, a malicious pickle), ``ckpt_path="last"``, fsspec storage (memory://, S3 on a local
moto server) and async saves."""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ModelCheckpoint
from framework import Trainer, TrainModule
from framework.checkpoint import (
    CheckpointError,
    begin_checkpoint,
    commit_checkpoint,
    describe_files,
    list_checkpoints,
    read_manifest,
    read_state,
    tensor_files,
)
from framework.testing import assert_modules_equal

BATCHES = 5  # per epoch: 20 samples, batch size 4


class TiedNet(TrainModule):
    """``linear2.weight`` is ``linear1.weight``: one parameter used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = torch.nn.Linear(4, 4, bias=False)
        self.linear2 = torch.nn.Linear(4, 4)
        self.linear2.weight = self.linear1.weight
        self.head = torch.nn.Linear(4, 1)

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(torch.tanh(self.linear2(torch.tanh(self.linear1(x))))), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.head(self.linear1(batch[0]))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.05)
        return [optimizer], [{"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5), "interval": "step"}]


def loader(shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * BATCHES, 4, generator=g), torch.randn(4 * BATCHES, 1, generator=g))
    return DataLoader(data, batch_size=4, shuffle=shuffle)


def make_module() -> TiedNet:
    torch.manual_seed(0)
    return TiedNet()


def train(root: Any, max_epochs: int, *, ckpt_path: str | None = None, callbacks: list | None = None,
          module: TiedNet | None = None, **kwargs: Any) -> tuple[Trainer, TiedNet]:
    """Fit a fresh TiedNet (same init and data seed every call) under ``root``."""
    module = module if module is not None else make_module()
    enable = callbacks is not None
    trainer = Trainer(default_root_dir=str(root), max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                      enable_checkpointing=enable, callbacks=callbacks, **kwargs)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer, module


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert_modules_equal(a, b)  # bit-identical; the message names each differing entry and its max abs diff


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> TiedNet:
    """The uninterrupted 2-epoch run every resumed run must match bit for bit."""
    return train(tmp_path_factory.mktemp("reference"), 2)[1]


def every_step(**kwargs: Any) -> ModelCheckpoint:
    callback = ModelCheckpoint(every_n_train_steps=1, save_top_k=-1, filename="step={step}",
                               auto_insert_metric_name=False, **kwargs)
    callback.FILE_EXTENSION = ""  # plain "step=N" directory names (Lightning's documented customisation)
    return callback


# ---- formats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
def test_format_written_through_the_trainer(tmp_path, safe):
    train(tmp_path, 1, callbacks=[every_step(safe_serialization=safe)])
    files = sorted(read_manifest(str(tmp_path / "checkpoints" / "step=5")).files)
    if safe:
        assert files == ["model.json", "model.safetensors", "rank-0.json", "rank-0.safetensors", "trainer.json",
                         "trainer.safetensors"]
    else:
        assert files == ["model.pt", "rank-0.pt", "trainer.pt"]
    assert sorted(os.listdir(tmp_path / "checkpoints" / "step=5")) == sorted(files + ["manifest.json"])


@pytest.mark.parametrize("saved_safe, resumed_safe", [(True, False), (False, True), (True, True), (False, False)])
def test_resume_loads_either_format_whichever_is_configured(tmp_path, reference, saved_safe, resumed_safe):
    train(tmp_path, 1, callbacks=[every_step(safe_serialization=saved_safe)])
    path = str(tmp_path / "checkpoints" / "step=3")
    trainer, module = train(tmp_path, 2, ckpt_path=path, callbacks=[every_step(safe_serialization=resumed_safe)])
    assert trainer.global_step == 2 * BATCHES
    assert_same_weights(module, reference)
    newest = read_manifest(str(tmp_path / "checkpoints" / "step=10"))
    assert ("model.safetensors" in newest.files) is resumed_safe and ("model.pt" in newest.files) is not resumed_safe


# ---- tied weights -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
def test_tied_weights_stay_tied_after_resume(tmp_path, reference, safe):
    train(tmp_path, 1, callbacks=[every_step(safe_serialization=safe)])
    path = str(tmp_path / "checkpoints" / "step=2")
    model_state = read_state(path, "model")
    assert model_state["linear1.weight"] is model_state["linear2.weight"], "stored once, loaded as one tensor"
    if safe:
        from safetensors import safe_open

        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            assert len(list(f.keys())) == 4  # linear1.weight (once), linear2.bias, head.weight, head.bias

    module = make_module()
    tied = module.linear1.weight
    trainer, module = train(tmp_path, 2, ckpt_path=path, module=module)
    assert module.linear2.weight is module.linear1.weight is tied
    assert len(trainer.optimizers[0].state) == 4, "the tied parameter trains as one parameter"
    assert_same_weights(module, reference)


def test_validate_test_predict_load_weights_from_ckpt_path(tmp_path, reference):
    train(tmp_path, 2, callbacks=[every_step()])
    path = str(tmp_path / "checkpoints" / "step=10")
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False)
    module = make_module()
    metrics = trainer.validate(module, loader(shuffle=False), ckpt_path=path)
    assert_same_weights(module, reference)
    assert module.linear1.weight is module.linear2.weight
    other = make_module()
    predictions = trainer.predict(other, loader(shuffle=False), ckpt_path=path)
    assert_same_weights(other, reference)
    with torch.no_grad():
        assert torch.equal(torch.cat(predictions), reference.predict_step(loader(shuffle=False).dataset[:], 0))
    assert set(metrics[0]) == {"val_loss"}


# ---- ckpt_path="last" and damaged checkpoints ------------------------------------------------------------------


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 3)  # inside the data (json: inside the document)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("damage, rel", [
    (truncate, "model.safetensors"), (truncate, "trainer.safetensors"), (truncate, "manifest.json"),
    (os.remove, "rank-0.json"), (os.remove, "manifest.json"),
])
def test_last_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path, reference, damage, rel):
    train(tmp_path, 1, callbacks=[every_step()])
    newest = tmp_path / "checkpoints" / "step=5"
    damage(str(newest / rel))
    with pytest.warns(UserWarning, match=r"step=5") as record:
        trainer, module = train(tmp_path, 2, ckpt_path="last", callbacks=[every_step()])
    assert any(rel in str(w.message) or "manifest" in str(w.message) for w in record)
    assert trainer.global_step == 10
    assert_same_weights(module, reference)  # resumed from step=4, redid step 5


def test_last_ignores_staging_dirs_of_an_unfinished_save(tmp_path, reference):
    train(tmp_path, 1, callbacks=[every_step()])
    shutil.copytree(tmp_path / "checkpoints" / "step=5", tmp_path / "checkpoints" / ".step=6.tmp-deadbeef")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer, module = train(tmp_path, 2, ckpt_path="last")
    assert_same_weights(module, reference)


def test_last_with_no_checkpoint_starts_fresh_with_a_warning(tmp_path, reference):
    with pytest.warns(UserWarning, match=r'ckpt_path="last" found no complete checkpoint.*checkpoints'):
        trainer, module = train(tmp_path, 2, ckpt_path="last", callbacks=[every_step()])
    assert trainer.global_step == 10
    assert_same_weights(module, reference)


def test_last_with_only_damaged_checkpoints_starts_fresh(tmp_path, reference):
    train(tmp_path, 1, callbacks=[every_step(total_limit=1)])
    truncate(str(tmp_path / "checkpoints" / "step=5" / "model.safetensors"))
    with pytest.warns(UserWarning) as record:
        trainer, module = train(tmp_path, 2, ckpt_path="last")
    messages = " | ".join(str(w.message) for w in record)
    assert "step=5" in messages and "found no complete checkpoint" in messages
    assert_same_weights(module, reference)


def test_last_after_going_back_to_an_earlier_checkpoint_is_the_newest_written(tmp_path):
    """Resuming an earlier checkpoint into the same folder (e.g. to get past a loss spike) abandons the
    later ones: rotation and "last" must follow the newly written checkpoints, not the higher steps."""
    train(tmp_path, 2, callbacks=[every_step()])
    dirpath = tmp_path / "checkpoints"
    trainer, _ = train(tmp_path, 2, max_steps=7, ckpt_path=str(dirpath / "step=4"),
                       callbacks=[every_step(total_limit=2)])
    # the abandoned step=5..10 are older than the new ones: rotation removed them (step=5 after "step=5-v1")
    assert sorted(os.listdir(dirpath)) == ["step=6", "step=7"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer, _ = train(tmp_path, 2, max_steps=8, ckpt_path="last")
    assert trainer.global_step == 8, "resumed the newest written checkpoint (step 7), not an abandoned later one"


def test_last_uses_the_callbacks_dirpath(tmp_path, reference):
    dirpath = str(tmp_path / "elsewhere")
    train(tmp_path / "a", 1, callbacks=[every_step(dirpath=dirpath)])
    trainer, module = train(tmp_path / "b", 2, ckpt_path="last", callbacks=[every_step(dirpath=dirpath)])
    assert_same_weights(module, reference)


@pytest.mark.parametrize("safe, rel", [(True, "model.safetensors"), (True, "model.json"), (True, "trainer.json"),
                                       (True, "rank-0.safetensors"), (False, "model.pt"), (False, "trainer.pt")])
def test_flipped_byte_is_a_clear_error_naming_the_file(tmp_path, safe, rel):
    train(tmp_path, 1, callbacks=[every_step(safe_serialization=safe)])
    path = str(tmp_path / "checkpoints" / "step=3")
    flip_byte(os.path.join(path, rel))
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"step=3.*{rel.replace('.', '[.]')}.*(checksum|damaged)"):
        train(tmp_path, 2, ckpt_path=path, module=module)
    if rel.startswith("model"):
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()), "damaged weights were loaded"


def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="nope.*does not exist"):
        train(tmp_path, 1, ckpt_path=str(tmp_path / "nope"))


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_malicious_model(good: str, evil: str, marker: str) -> None:
    """Rebuild checkpoint ``good`` at ``evil`` with ``model.pt`` replaced by a pickle that creates ``marker``;
    the manifest lists it with its correct size and checksum (as an attacker with write access would)."""
    staging = begin_checkpoint(evil)
    names = [n for n in os.listdir(good) if n != "manifest.json" and not n.startswith("model.")]
    for name in names:
        shutil.copy(os.path.join(good, name), os.path.join(staging.dir, name))
    torch.save({"linear1.weight": _Exploit(marker)}, os.path.join(staging.dir, "model.pt"))
    commit_checkpoint(staging, describe_files(staging, names + ["model.pt"]), {"global_step": 99})


@pytest.mark.parametrize("stage", ["fit", "validate", "last"])
def test_malicious_pickle_is_never_executed(tmp_path, stage):
    train(tmp_path, 1, callbacks=[every_step()])
    evil = str(tmp_path / "checkpoints" / "step=99")
    marker = str(tmp_path / "pwned")
    plant_malicious_model(str(tmp_path / "checkpoints" / "step=5"), evil, marker)
    assert "model.pt" in read_manifest(evil).files
    with pytest.raises(CheckpointError, match=r"step=99.*model\.pt.*unpickle"):
        if stage == "validate":
            Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_progress_bar=False,
                    enable_checkpointing=False).validate(make_module(), loader(), ckpt_path=evil)
        else:
            train(tmp_path, 2, ckpt_path=evil if stage == "fit" else "last")
    assert not os.path.exists(marker)


# ---- fsspec storage -------------------------------------------------------------------------------------------------


def remote_names(fs: Any, path: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def check_remote_rotation_and_resume(root: str, fs: Any, path: str, reference: TiedNet) -> None:
    train(root, 1, callbacks=[ModelCheckpoint(every_n_train_steps=2, total_limit=2)])
    assert remote_names(fs, f"{path}/checkpoints") == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    assert [m.path for m in list_checkpoints(f"{root}/checkpoints")] == [
        f"{root}/checkpoints/epoch=0-step=4.ckpt", f"{root}/checkpoints/epoch=0-step=2.ckpt"]
    callback = ModelCheckpoint(every_n_train_steps=2, total_limit=2)
    trainer, module = train(root, 2, ckpt_path="last", callbacks=[callback])
    assert_same_weights(module, reference)
    assert remote_names(fs, f"{path}/checkpoints") == ["epoch=1-step=10.ckpt", "epoch=1-step=8.ckpt"]
    assert callback.best_model_path == f"{root}/checkpoints/epoch=1-step=10.ckpt"  # no monitor: the newest


def test_memory_filesystem_save_rotate_resume_last(reference):
    import fsspec

    fs = fsspec.filesystem("memory")
    path = f"/kiln-{uuid.uuid4().hex[:8]}/run"
    try:
        check_remote_rotation_and_resume(f"memory://{path}", fs, path, reference)
    finally:
        fs.rm(path, recursive=True)


@pytest.mark.timeout(180)
def test_s3_save_rotate_resume_last_with_env_credentials(moto_endpoint, monkeypatch, reference):
    """default_root_dir="s3://bucket/run"; endpoint and credentials come from the usual AWS variables."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    s3fs.S3FileSystem.clear_instance_cache()  # instances made before may point elsewhere
    try:
        fs = s3fs.S3FileSystem()
        bucket = f"kiln-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket)
        check_remote_rotation_and_resume(f"s3://{bucket}/run", fs, f"{bucket}/run", reference)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


# ---- async saves --------------------------------------------------------------------------------------------


def manifest_entries(path: str) -> dict[str, Any]:
    return read_manifest(path).files


@pytest.mark.parametrize("safe", [True, False])
def test_async_save_writes_the_same_checkpoints_as_sync(tmp_path, reference, safe):
    """Same run, same folder, sync then async: every checkpoint file is byte-identical (same checksums)."""
    root = tmp_path / "run"
    train(root, 2, callbacks=[every_step(safe_serialization=safe, total_limit=4)])
    shutil.move(str(root), str(tmp_path / "sync"))
    callback = every_step(safe_serialization=safe, total_limit=4, async_save=True)
    trainer, module = train(root, 2, callbacks=[callback])

    names = sorted(os.listdir(root / "checkpoints"))
    assert names == ["step=10", "step=7", "step=8", "step=9"]
    assert names == sorted(os.listdir(tmp_path / "sync" / "checkpoints"))
    for name in names:
        assert manifest_entries(str(root / "checkpoints" / name)) == \
            manifest_entries(str(tmp_path / "sync" / "checkpoints" / name))
    assert callback.best_model_path == str(root / "checkpoints" / "step=10")  # no monitor: the newest

    path = str(root / "checkpoints" / "step=8")
    resumed = train(root, 2, ckpt_path=path, callbacks=[every_step(async_save=True)])[1]
    assert_same_weights(resumed, reference)
    finished = train(root, 2, ckpt_path="last", callbacks=[every_step(async_save=True)])[1]  # step=10: complete
    assert_same_weights(finished, reference)


def test_async_save_failure_surfaces_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    real_write = tensor_files.write_safetensors
    calls = {"n": 0}

    def flaky_write(loc, tensors, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 3 + 2:  # the 4th checkpoint
            raise OSError(28, "No space left on device")
        return real_write(loc, tensors, **kwargs)

    monkeypatch.setattr(tensor_files, "write_safetensors", flaky_write)
    with pytest.raises(OSError, match="No space left"):
        train(tmp_path, 2, callbacks=[every_step(total_limit=2, async_save=True)])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step=2", "step=3"]
