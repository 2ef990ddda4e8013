"""ModelCheckpoint through Trainer.fit: naming, total_limit rotation, top-k, cadence, save_last,
delete-after-commit, custom filenames, and trainer.save_checkpoint for manual saves."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callbacks import ModelCheckpoint
from framework.checkpoint import list_checkpoints, read_manifest, read_state, tensor_files, verify_checkpoint
from framework.checkpoint.owner import OWNER_PREFIX, owner_record

BATCHES_PER_EPOCH = 5  # make_loader(): 20 samples, batch_size 4


def listing(dirpath: str) -> list[str]:
    """Everything in ``dirpath``, hidden entries included (dirpath must hold only checkpoint dirs)."""
    return sorted(os.listdir(dirpath)) if os.path.isdir(dirpath) else []


def auto_name(step: int) -> str:
    return f"epoch={(step - 1) // BATCHES_PER_EPOCH}-step={step}"


def saved_steps(total_steps: int, every_n_train_steps: int | None, every_n_epochs: int | None) -> list[int]:
    """Global steps at which a checkpoint is written (one per step even when both cadences hit it)."""
    steps = set()
    for s in range(1, total_steps + 1):
        if every_n_train_steps and s % every_n_train_steps == 0:
            steps.add(s)
        if every_n_epochs and s % BATCHES_PER_EPOCH == 0 and (s // BATCHES_PER_EPOCH) % every_n_epochs == 0:
            steps.add(s)
    return sorted(steps)


@pytest.fixture
def scored_module_cls(tiny_module_cls):
    """TinyModule that logs ``score = scores[step]`` on every training step (a metric the test controls)."""

    class Scored(tiny_module_cls):
        def __init__(self, scores: list[float]) -> None:
            super().__init__()
            self.scores = scores

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.log("score", torch.tensor(self.scores[self.global_step]))
            return super().training_step(batch, batch_idx)

    return Scored


def fit(make_trainer, module, make_loader, callback: ModelCheckpoint, max_epochs: int = 3, **kwargs: Any):
    trainer = make_trainer(max_epochs=max_epochs, enable_checkpointing=True, callbacks=[callback], **kwargs)
    trainer.fit(module, make_loader())
    return trainer


# ---- total_limit and automatic naming ------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(total_limit=st.integers(1, 4), every_n_train_steps=st.sampled_from([None, 1, 2, 3, 4]),
       every_n_epochs=st.sampled_from([None, 1, 2]))
def test_total_limit_keeps_the_k_newest_with_automatic_names(tmp_path_factory, tiny_module_cls, make_loader,
                                                            total_limit, every_n_train_steps, every_n_epochs):
    root = tmp_path_factory.mktemp("run")
    callback = ModelCheckpoint(total_limit=total_limit, every_n_train_steps=every_n_train_steps,
                               every_n_epochs=every_n_epochs)
    from framework import Trainer

    trainer = Trainer(default_root_dir=str(root), max_epochs=3, logger=False, enable_progress_bar=False,
                      callbacks=[callback])
    trainer.fit(tiny_module_cls(), make_loader())

    dirpath = str(root / "checkpoints")
    expected = [auto_name(s) for s in saved_steps(3 * BATCHES_PER_EPOCH, every_n_train_steps, every_n_epochs)]
    assert listing(dirpath) == sorted(expected[-total_limit:])
    assert [os.path.basename(m.path) for m in list_checkpoints(dirpath)] == expected[::-1][:total_limit]
    if expected:
        assert callback.last_model_path == os.path.join(dirpath, expected[-1])


def test_without_limits_every_checkpoint_is_kept(make_trainer, tiny_module_cls, make_loader, tmp_path):
    fit(make_trainer, tiny_module_cls(), make_loader, ModelCheckpoint(every_n_train_steps=4))
    expected = [auto_name(s) for s in saved_steps(15, 4, 1)]
    assert listing(str(tmp_path / "checkpoints")) == sorted(expected)
    for name in expected:
        verify_checkpoint(str(tmp_path / "checkpoints" / name))


@pytest.mark.parametrize("every_n_train_steps, every_n_epochs, max_epochs", [
    (None, 2, 5), (None, 1, 2), (3, None, 2), (7, 2, 4), (None, None, 2),
])
def test_cadence_every_n_steps_and_epochs(make_trainer, tiny_module_cls, make_loader, tmp_path,
                                          every_n_train_steps, every_n_epochs, max_epochs):
    fit(make_trainer, tiny_module_cls(), make_loader,
        ModelCheckpoint(every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs), max_epochs)
    steps = saved_steps(max_epochs * BATCHES_PER_EPOCH, every_n_train_steps, every_n_epochs)
    assert listing(str(tmp_path / "checkpoints")) == sorted(auto_name(s) for s in steps)
    for s in steps:
        assert read_manifest(str(tmp_path / "checkpoints" / auto_name(s))).global_step == s


def test_every_n_train_steps_counts_optimizer_steps_under_accumulation(make_trainer, tiny_module_cls, make_loader,
                                                                       tmp_path):
    # 5 batches per epoch with accumulation 2: windows of 2, 2, 1 -> 3 optimizer steps per epoch
    fit(make_trainer, tiny_module_cls(), make_loader, ModelCheckpoint(every_n_train_steps=2, every_n_epochs=None),
        max_epochs=2, accumulate_grad_batches=2)
    assert listing(str(tmp_path / "checkpoints")) == ["epoch=0-step=2", "epoch=1-step=4", "epoch=1-step=6"]
    loop = read_state(str(tmp_path / "checkpoints" / "epoch=0-step=2"), "trainer")["loop"]
    assert (loop["batches_done"], loop["epoch_finished"]) == (4, False)


# ---- top-k by a monitored metric ----------------------------------------------------------------------

SCORES = [5.0, 3.0, 8.0, 1.0, 9.0, 2.0, 7.0, 6.0, 4.0, 10.0]  # score logged at step i+1


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("save_top_k", [1, 2, 3])
@pytest.mark.parametrize("save_last", [False, True])
def test_top_k_keeps_the_k_best(make_trainer, scored_module_cls, make_loader, tmp_path, mode, save_top_k,
                                save_last):
    callback = ModelCheckpoint(monitor="score", mode=mode, save_top_k=save_top_k, every_n_train_steps=1,
                               every_n_epochs=None, save_last=save_last, filename="step={step}")
    fit(make_trainer, scored_module_cls(SCORES), make_loader, callback, max_epochs=2)

    ranked = sorted(range(1, 11), key=lambda s: SCORES[s - 1], reverse=mode == "max")
    best = ranked[:save_top_k]
    kept = set(best) | ({10} if save_last else set())
    dirpath = tmp_path / "checkpoints"
    assert listing(str(dirpath)) == sorted(f"step={s}" for s in kept)
    assert callback.best_model_path == str(dirpath / f"step={best[0]}")
    assert callback.best_model_score == SCORES[best[0] - 1]
    assert set(callback.best_k_models) == {str(dirpath / f"step={s}") for s in best}
    assert callback.last_model_path == str(dirpath / "step=10")


def test_top_k_continues_after_resume(make_trainer, scored_module_cls, make_loader, tmp_path):
    """The ranking restored from a checkpoint predates that checkpoint's own rotation (it still lists the
    checkpoints the rotation then deleted); continuing must neither fail on them nor keep stale ones."""
    def callback() -> ModelCheckpoint:
        return ModelCheckpoint(monitor="score", save_top_k=1, every_n_train_steps=1, every_n_epochs=None,
                               filename="step={step}")

    trainer = make_trainer(max_steps=4, max_epochs=2, enable_checkpointing=True, callbacks=[callback()])
    trainer.fit(scored_module_cls(SCORES), make_loader())
    dirpath = tmp_path / "checkpoints"
    assert listing(str(dirpath)) == ["step=4"]

    resumed_callback = callback()
    resumed = make_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[resumed_callback])
    resumed.fit(scored_module_cls(SCORES), make_loader(), ckpt_path="last")
    assert listing(str(dirpath)) == ["step=10", "step=4"]
    assert resumed_callback.best_model_path == str(dirpath / "step=4")


def test_top_k_and_total_limit_together(make_trainer, scored_module_cls, make_loader, tmp_path):
    # A checkpoint goes when either rule drops it; the newest always stays (save_last). At step 10 the
    # survivors are steps 2, 4, 6 (top-3) and 9 (kept as the newest so far): 9 is no longer the newest and
    # not top-3, and 2 is not among the 4 newest (10, 9, 6, 4).
    callback = ModelCheckpoint(monitor="score", save_top_k=3, total_limit=4, every_n_train_steps=1,
                               every_n_epochs=None, filename="step={step}")
    fit(make_trainer, scored_module_cls(SCORES), make_loader, callback, max_epochs=2)
    assert listing(str(tmp_path / "checkpoints")) == ["step=10", "step=4", "step=6"]


def test_top_k_zero_saves_nothing_but_the_newest(make_trainer, scored_module_cls, make_loader, tmp_path):
    callback = ModelCheckpoint(monitor="score", save_top_k=0, every_n_train_steps=1, every_n_epochs=None)
    fit(make_trainer, scored_module_cls(SCORES), make_loader, callback, max_epochs=2)
    assert listing(str(tmp_path / "checkpoints")) == ["epoch=1-step=10"]


def test_nan_score_ranks_worst(make_trainer, scored_module_cls, make_loader, tmp_path):
    scores = [1.0, float("nan"), 2.0, 3.0, 4.0]
    callback = ModelCheckpoint(monitor="score", save_top_k=2, every_n_train_steps=1, every_n_epochs=None,
                               save_last=False, filename="step={step}")
    fit(make_trainer, scored_module_cls(scores), make_loader, callback, max_epochs=1)
    assert listing(str(tmp_path / "checkpoints")) == ["step=1", "step=3"]


def test_missing_monitor_fails_once_validation_ran(make_trainer, tiny_module_cls, make_loader):
    trainer = make_trainer(max_epochs=1, enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(monitor="val_acc", save_top_k=1)])
    with pytest.raises(KeyError, match=r"monitor='val_acc'.*train_loss.*val_loss"):
        trainer.fit(tiny_module_cls(), make_loader(), make_loader())


def test_validation_metric_monitored_before_the_first_validation(make_trainer, tiny_module_cls, make_loader,
                                                                  tmp_path):
    """Step saves before validation first logs val_loss are kept (ranked last), with one warning."""
    callback = ModelCheckpoint(monitor="val_loss", save_top_k=1, every_n_train_steps=2, filename="step={step}")
    trainer = make_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[callback])
    with pytest.warns(UserWarning, match="monitor='val_loss'.*Validation has not run yet") as record:
        trainer.fit(tiny_module_cls(), make_loader(), make_loader())
    assert sum("monitor='val_loss'" in str(w.message) for w in record) == 1
    dirpath = tmp_path / "checkpoints"
    # saves at steps 2, 4 (unranked), 5 (epoch end, after validation), 6, 8 (epoch 0's val_loss), 10
    assert callback.best_model_score is not None and math.isfinite(callback.best_model_score)
    assert listing(str(dirpath)) == sorted({os.path.basename(callback.best_model_path), "step=10"})
    assert os.path.basename(callback.best_model_path) in {"step=5", "step=6", "step=8", "step=10"}


# ---- filenames ------------------------------------------------------------------------------------------


def test_filename_with_metric(make_trainer, scored_module_cls, make_loader, tmp_path):
    callback = ModelCheckpoint(filename="e{epoch}-s{step}-score{score:.2f}", monitor="score", mode="max",
                               save_top_k=2, every_n_train_steps=2, every_n_epochs=None, save_last=False)
    fit(make_trainer, scored_module_cls(SCORES), make_loader, callback, max_epochs=2)
    # saves at steps 2, 4, 6, 8, 10 with scores 3, 1, 2, 6, 10: the two highest remain
    assert listing(str(tmp_path / "checkpoints")) == ["e1-s10-score10.00", "e1-s8-score6.00"]
    assert callback.best_model_path.endswith("e1-s10-score10.00")


def test_repeated_filename_gets_a_version_suffix(make_trainer, tiny_module_cls, make_loader, tmp_path):
    fit(make_trainer, tiny_module_cls(), make_loader, ModelCheckpoint(filename="model"), max_epochs=3)
    assert listing(str(tmp_path / "checkpoints")) == ["model", "model-v1", "model-v2"]
    assert read_manifest(str(tmp_path / "checkpoints" / "model-v2")).global_step == 15


@pytest.mark.parametrize("kwargs, match", [
    (dict(filename="a/b"), "filename='a/b'"),
    (dict(mode="mean"), "mode='mean'"),
    (dict(save_top_k=2), "needs monitor"),
    (dict(total_limit=-1), "total_limit=-1"),
    (dict(every_n_train_steps=1.5), "every_n_train_steps=1.5"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelCheckpoint(**kwargs)


def test_unformattable_filename_names_the_fields(make_trainer, tiny_module_cls, make_loader):
    with pytest.raises(ValueError, match=r"filename='\{nope\}'.*train_loss"):
        fit(make_trainer, tiny_module_cls(), make_loader, ModelCheckpoint(filename="{nope}"), max_epochs=1)


# ---- rotation only after the new checkpoint is complete ----------------------------------------------------


@pytest.mark.parametrize("fail_on", [0, 1, 2])
def test_failed_save_deletes_nothing(make_trainer, tiny_module_cls, make_loader, tmp_path, monkeypatch, fail_on):
    """total_limit=2: when writing any file of the 4th checkpoint fails, the two previous ones survive."""
    real_write = tensor_files.write_safetensors
    calls = {"n": 0}

    def flaky_write(loc, tensors, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 3 + fail_on + 1:  # the 1st, 2nd or 3rd state file of the 4th checkpoint
            with loc.open("wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_write(loc, tensors, **kwargs)

    monkeypatch.setattr(tensor_files, "write_safetensors", flaky_write)
    module = tiny_module_cls()
    callback = ModelCheckpoint(total_limit=2, every_n_train_steps=1, every_n_epochs=None, filename="step={step}")
    with pytest.raises(OSError, match="No space left"):
        fit(make_trainer, module, make_loader, callback, max_epochs=1)
    monkeypatch.setattr(tensor_files, "write_safetensors", real_write)

    dirpath = tmp_path / "checkpoints"
    assert [os.path.basename(m.path) for m in list_checkpoints(str(dirpath))] == ["step=3", "step=2"]
    assert listing(str(dirpath)) == ["step=2", "step=3"], "the failed save left files behind"
    for name in ("step=2", "step=3"):
        verify_checkpoint(str(dirpath / name))
    # and the newest one resumes
    resumed = make_trainer(max_epochs=1)
    fresh = tiny_module_cls()
    resumed.fit(fresh, make_loader(), ckpt_path=str(dirpath / "step=3"))
    assert resumed.global_step == 5


def test_fit_start_removes_leftovers_of_saves_cut_short_by_a_crash(make_trainer, tiny_module_cls, make_loader,
                                                                   tmp_path):
    dirpath = tmp_path / "checkpoints"
    crashed = subprocess.Popen([sys.executable, "-c", "pass"])  # the writer that was cut short: gone
    crashed.wait()
    for leftover in (".epoch=0-step=2.tmp-0123abcd", ".epoch=0-step=1.old-4567ef"):
        (dirpath / leftover).mkdir(parents=True)
        (dirpath / leftover / "model.safetensors").write_bytes(b"partial")
    (dirpath / ".epoch=0-step=2.tmp-0123abcd" / f"{OWNER_PREFIX}x").write_bytes(owner_record(crashed.pid))
    (dirpath / ".keep").mkdir()  # not a staging dir: left alone
    fit(make_trainer, tiny_module_cls(), make_loader, ModelCheckpoint(total_limit=1), max_epochs=1)
    assert listing(str(dirpath)) == [".keep", "epoch=0-step=5"]


# ---- manual saves ---------------------------------------------------------------------------------------------


def test_manual_save_checkpoint_round_trips(make_trainer, tiny_module_cls, make_loader, tmp_path):
    trainer = make_trainer(max_epochs=2)
    module = tiny_module_cls()
    trainer.fit(module, make_loader())
    path = str(tmp_path / "manual")
    trainer.save_checkpoint(path)
    manifest = verify_checkpoint(path)
    assert manifest.global_step == 10 and manifest.metadata["epoch"] == 2
    assert set(manifest.state_names()) == {"model", "trainer", "rank-0"}
    # overwriting a checkpoint in place replaces it atomically
    trainer.save_checkpoint(path)
    verify_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == ["manual"]

    other = tiny_module_cls()
    resumed = make_trainer(max_epochs=3)
    resumed.fit(other, make_loader(), ckpt_path=path)
    assert resumed.global_step == 15


def test_manual_save_inside_an_accumulation_window_warns(make_trainer, tiny_module_cls, make_loader, tmp_path):
    from callbacks import Callback

    class SaveEveryBatch(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            trainer.save_checkpoint(str(tmp_path / f"batch={batch_idx}"))

    trainer = make_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[SaveEveryBatch()])
    with pytest.warns(UserWarning, match="inside a gradient accumulation window") as record:
        trainer.fit(tiny_module_cls(), make_loader())
    # windows: batches (0, 1), (2, 3), (4,): only after batches 0 and 2 are gradients pending
    assert sum("accumulation window" in str(w.message) for w in record) == 2


def test_manual_save_needs_a_module(make_trainer, tmp_path):
    with pytest.raises(RuntimeError, match="save_checkpoint"):
        make_trainer().save_checkpoint(str(tmp_path / "x"))
