"""ModelCheckpoint through Trainer.fit: Kiln's side of it — directory names, total_limit rotation, top-k
with delete-after-commit, cadence under accumulation, save_last (copy and link), bad arguments refused at
construction, "best" resolution, and trainer.save_checkpoint for manual saves. Lightning's own behaviour
tests, ported, are in test_model_checkpoint_lightning.py."""

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
from framework.exceptions import MisconfigurationException

BATCHES_PER_EPOCH = 5  # make_loader(): 20 samples, batch_size 4


def listing(dirpath: str) -> list[str]:
    """Everything in ``dirpath``, hidden entries included (dirpath must hold only checkpoint dirs)."""
    return sorted(os.listdir(dirpath)) if os.path.isdir(dirpath) else []


def auto_name(step: int) -> str:
    return f"epoch={(step - 1) // BATCHES_PER_EPOCH}-step={step}.ckpt"


def saved_steps(total_steps: int, every_n_train_steps: int | None, every_n_epochs: int | None) -> list[int]:
    """Global steps at which a checkpoint is written."""
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
       every_n_epochs=st.sampled_from([None, 2]), save_top_k=st.sampled_from([1, -1]))
def test_total_limit_keeps_the_k_newest_with_automatic_names(tmp_path_factory, tiny_module_cls, make_loader,
                                                            total_limit, every_n_train_steps, every_n_epochs,
                                                            save_top_k):
    if every_n_train_steps and every_n_epochs:
        every_n_epochs = None  # Lightning: one schedule per callback
    root = tmp_path_factory.mktemp("run")
    callback = ModelCheckpoint(total_limit=total_limit, every_n_train_steps=every_n_train_steps,
                               every_n_epochs=every_n_epochs, save_top_k=save_top_k)
    from framework import Trainer

    trainer = Trainer(default_root_dir=str(root), max_epochs=3, logger=False, enable_progress_bar=False,
                      callbacks=[callback])
    trainer.fit(tiny_module_cls(), make_loader())

    dirpath = str(root / "checkpoints")
    default_epochs = every_n_epochs if every_n_train_steps is None else None
    expected = [auto_name(s) for s in saved_steps(3 * BATCHES_PER_EPOCH, every_n_train_steps, default_epochs or (
        1 if every_n_train_steps is None else None))]
    assert listing(dirpath) == sorted(expected[-total_limit:])
    assert [os.path.basename(m.path) for m in list_checkpoints(dirpath)] == expected[::-1][:total_limit]
    assert callback.best_model_path == os.path.join(dirpath, expected[-1])  # no monitor: the newest


@pytest.mark.parametrize("save_top_k, kept", [(1, [15]), (-1, [5, 10, 15]), (0, [])])
def test_without_monitor_save_top_k_keeps_the_newest_all_or_none(make_trainer, tiny_module_cls, make_loader,
                                                                 tmp_path, save_top_k, kept):
    callback = ModelCheckpoint(save_top_k=save_top_k)
    fit(make_trainer, tiny_module_cls(), make_loader, callback)
    assert listing(str(tmp_path / "checkpoints")) == [auto_name(s) for s in kept]
    for s in kept:
        verify_checkpoint(str(tmp_path / "checkpoints" / auto_name(s)))
    assert callback.best_model_path == (str(tmp_path / "checkpoints" / auto_name(15)) if kept else "")


@pytest.mark.parametrize("every_n_train_steps, every_n_epochs, max_epochs", [
    (None, 2, 5), (None, 1, 2), (3, None, 2), (None, None, 2),
])
def test_cadence_every_n_steps_or_epochs(make_trainer, tiny_module_cls, make_loader, tmp_path,
                                         every_n_train_steps, every_n_epochs, max_epochs):
    callback = ModelCheckpoint(every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs, save_top_k=-1)
    fit(make_trainer, tiny_module_cls(), make_loader, callback, max_epochs)
    epochs = every_n_epochs if every_n_epochs or every_n_train_steps else 1
    steps = saved_steps(max_epochs * BATCHES_PER_EPOCH, every_n_train_steps, epochs)
    assert listing(str(tmp_path / "checkpoints")) == sorted(auto_name(s) for s in steps)
    for s in steps:
        assert read_manifest(str(tmp_path / "checkpoints" / auto_name(s))).global_step == s


def test_every_n_train_steps_counts_optimizer_steps_under_accumulation(make_trainer, tiny_module_cls, make_loader,
                                                                       tmp_path):
    # 5 batches per epoch with accumulation 2: windows of 2, 2, 1 -> 3 optimizer steps per epoch
    fit(make_trainer, tiny_module_cls(), make_loader, ModelCheckpoint(every_n_train_steps=2, save_top_k=-1),
        max_epochs=2, accumulate_grad_batches=2)
    assert listing(str(tmp_path / "checkpoints")) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt",
                                                      "epoch=1-step=6.ckpt"]
    loop = read_state(str(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"), "trainer")["loop"]
    assert (loop["batches_done"], loop["epoch_finished"]) == (4, False)


# ---- top-k by a monitored metric ----------------------------------------------------------------------

SCORES = [5.0, 3.0, 8.0, 1.0, 9.0, 2.0, 7.0, 6.0, 4.0, 10.0]  # score logged at step i+1


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("save_top_k", [1, 2, 3])
@pytest.mark.parametrize("save_last", [False, True, "link"])
def test_top_k_keeps_the_k_best(make_trainer, scored_module_cls, make_loader, tmp_path, mode, save_top_k,
                                save_last):
    callback = ModelCheckpoint(monitor="score", mode=mode, save_top_k=save_top_k, every_n_train_steps=1,
                               save_last=save_last, filename="{step}")
    fit(make_trainer, scored_module_cls(SCORES), make_loader, callback, max_epochs=2)

    ranked = sorted(range(1, 11), key=lambda s: SCORES[s - 1], reverse=mode == "max")
    best = ranked[:save_top_k]
    dirpath = tmp_path / "checkpoints"
    names = sorted(f"step={s}.ckpt" for s in best) + (["last.ckpt"] if save_last else [])
    assert listing(str(dirpath)) == sorted(names)
    assert callback.best_model_path == str(dirpath / f"step={best[0]}.ckpt")
    assert callback.best_model_score == SCORES[best[0] - 1]
    assert set(callback.best_k_models) == {str(dirpath / f"step={s}.ckpt") for s in best}
    assert callback.kth_best_model_path == str(dirpath / f"step={best[-1]}.ckpt")
    assert callback.kth_value == SCORES[best[-1] - 1]
    assert callback.current_score == SCORES[max(best) - 1]  # the score of the newest top-k save
    if save_last:
        assert callback.last_model_path == str(dirpath / "last.ckpt")
    if save_last is True:  # a full checkpoint of the final step
        assert read_manifest(str(dirpath / "last.ckpt")).global_step == 10
    if save_last == "link":  # Lightning: a link to the newest checkpoint saved, here the newest top-k one
        assert os.readlink(dirpath / "last.ckpt") == f"step={max(best)}.ckpt"
        assert read_manifest(str(dirpath / "last.ckpt")).global_step == max(best)


def test_top_k_continues_after_resume(make_trainer, scored_module_cls, make_loader, tmp_path):
    """The ranking restored from a checkpoint continues: a resumed run keeps the best of both parts."""
    def callback() -> ModelCheckpoint:
        return ModelCheckpoint(monitor="score", save_top_k=1, every_n_train_steps=1, filename="{step}",
                               save_last=True)

    trainer = make_trainer(max_steps=4, max_epochs=2, enable_checkpointing=True, callbacks=[callback()])
    trainer.fit(scored_module_cls(SCORES), make_loader())
    dirpath = tmp_path / "checkpoints"
    assert listing(str(dirpath)) == ["last.ckpt", "step=4.ckpt"]

    resumed_callback = callback()
    resumed = make_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[resumed_callback])
    resumed.fit(scored_module_cls(SCORES), make_loader(), ckpt_path="last")
    assert resumed.global_step == 10
    assert listing(str(dirpath)) == ["last.ckpt", "step=4.ckpt"]
    assert resumed_callback.best_model_path == str(dirpath / "step=4.ckpt")
    assert resumed_callback.best_model_score == 1.0


def test_top_k_and_total_limit_together(make_trainer, scored_module_cls, make_loader, tmp_path):
    # Both rules delete: top-k drops the worst, total_limit all but the 2 newest — never the best.
    # What either deletes leaves best_k_models, so the ranking only names checkpoints that exist.
    callback = ModelCheckpoint(monitor="score", save_top_k=3, total_limit=2, every_n_train_steps=1,
                               filename="{step}")
    fit(make_trainer, scored_module_cls(SCORES), make_loader, callback, max_epochs=2)
    dirpath = tmp_path / "checkpoints"
    kept = listing(str(dirpath))
    assert "step=4.ckpt" in kept and callback.best_model_path == str(dirpath / "step=4.ckpt")  # score 1.0
    assert len(kept) <= 3
    assert set(callback.best_k_models) == {str(dirpath / n) for n in kept}


def test_top_k_zero_saves_nothing_but_last(make_trainer, scored_module_cls, make_loader, tmp_path):
    callback = ModelCheckpoint(monitor="score", save_top_k=0, every_n_train_steps=1, save_last=True)
    fit(make_trainer, scored_module_cls(SCORES), make_loader, callback, max_epochs=2)
    assert listing(str(tmp_path / "checkpoints")) == ["last.ckpt"]
    assert callback.best_model_path == "" and callback.best_k_models == {}


def test_nan_score_ranks_worst(make_trainer, scored_module_cls, make_loader, tmp_path):
    scores = [1.0, float("nan"), 2.0, 3.0, 4.0]
    callback = ModelCheckpoint(monitor="score", save_top_k=2, every_n_train_steps=1, filename="{step}")
    fit(make_trainer, scored_module_cls(scores), make_loader, callback, max_epochs=1)
    assert listing(str(tmp_path / "checkpoints")) == ["step=1.ckpt", "step=3.ckpt"]


def test_missing_monitor_fails_once_validation_ran(make_trainer, tiny_module_cls, make_loader):
    trainer = make_trainer(max_epochs=1, enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(monitor="val_acc", save_top_k=1)])
    with pytest.raises(MisconfigurationException, match=r"monitor='val_acc'.*could not find.*'val_loss'"):
        trainer.fit(tiny_module_cls(), make_loader(), make_loader())


def test_step_saves_wait_for_a_validation_metric(make_trainer, tiny_module_cls, make_loader, tmp_path):
    """every_n_train_steps with a validation metric not logged yet defers the save to the next validation."""
    callback = ModelCheckpoint(monitor="val_loss", save_top_k=-1, every_n_train_steps=2, filename="{step}",
                               save_on_train_epoch_end=False)
    trainer = make_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[callback])
    trainer.fit(tiny_module_cls(), make_loader(), make_loader())
    # steps 2, 4: no val_loss yet -> deferred to the validation at step 5; then 6, 8 have epoch 0's val_loss;
    # step 10 is the last batch before validation: deferred to that validation (fresh metric)
    assert listing(str(tmp_path / "checkpoints")) == ["step=10.ckpt", "step=5.ckpt", "step=6.ckpt", "step=8.ckpt"]
    assert all(math.isfinite(float(v)) for v in callback.best_k_models.values())


# ---- filenames and arguments ------------------------------------------------------------------------------


def test_filename_with_metric(make_trainer, scored_module_cls, make_loader, tmp_path):
    callback = ModelCheckpoint(filename="e{epoch}-s{step}-score{score:.2f}", monitor="score", mode="max",
                               save_top_k=2, every_n_train_steps=2, auto_insert_metric_name=False)
    fit(make_trainer, scored_module_cls(SCORES), make_loader, callback, max_epochs=2)
    # saves at steps 2, 4, 6, 8, 10 with scores 3, 1, 2, 6, 10: the two highest remain
    assert listing(str(tmp_path / "checkpoints")) == ["e1-s10-score10.00.ckpt", "e1-s8-score6.00.ckpt"]
    assert callback.best_model_path.endswith("e1-s10-score10.00.ckpt")


def test_repeated_filename_gets_a_version_suffix(make_trainer, tiny_module_cls, make_loader, tmp_path):
    # With a monitor each save is new (no monitor: Lightning reuses the previous newest name, see below).
    fit(make_trainer, tiny_module_cls(), make_loader,
        ModelCheckpoint(filename="model", monitor="step", mode="max", save_top_k=-1), max_epochs=3)
    assert listing(str(tmp_path / "checkpoints")) == ["model-v1.ckpt", "model-v2.ckpt", "model.ckpt"]
    assert read_manifest(str(tmp_path / "checkpoints" / "model-v2.ckpt")).global_step == 15


def test_without_monitor_the_newest_name_is_reused(make_trainer, tiny_module_cls, make_loader, tmp_path):
    fit(make_trainer, tiny_module_cls(), make_loader, ModelCheckpoint(filename="model", save_top_k=-1), max_epochs=3)
    assert listing(str(tmp_path / "checkpoints")) == ["model.ckpt"]
    assert verify_checkpoint(str(tmp_path / "checkpoints" / "model.ckpt")).global_step == 15


def test_without_version_counter_a_repeated_name_is_replaced_atomically(make_trainer, tiny_module_cls,
                                                                        make_loader, tmp_path):
    fit(make_trainer, tiny_module_cls(), make_loader,
        ModelCheckpoint(filename="model", monitor="step", save_top_k=-1, enable_version_counter=False), max_epochs=3)
    assert listing(str(tmp_path / "checkpoints")) == ["model.ckpt"]
    assert verify_checkpoint(str(tmp_path / "checkpoints" / "model.ckpt")).global_step == 15


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(filename=".."), ValueError, r"filename='\.\.'.*hidden"),
    (dict(filename=".hidden"), ValueError, r"filename='\.hidden'.*hidden"),
    (dict(filename="a/b"), ValueError, r"filename='a/b'.*'/'"),
    (dict(filename="{val/loss:.2f}"), ValueError, "auto_insert_metric_name=False"),
    (dict(filename="{epoch:zz}"), ValueError, "not a valid template"),
    (dict(filename=3), TypeError, "filename=3"),
    (dict(mode="mean"), ValueError, "mode"),
    (dict(save_top_k=2), ValueError, "No quantity for top_k"),
    (dict(save_top_k=-2), ValueError, "save_top_k=-2"),
    (dict(total_limit=0), ValueError, "total_limit=0"),
    (dict(every_n_train_steps=1.5), ValueError, "every_n_train_steps=1.5"),
    (dict(every_n_train_steps=2, every_n_epochs=1), ValueError, "mutually exclusive"),
    (dict(save_last="yes"), ValueError, "save_last='yes'"),
    (dict(train_time_interval=30), TypeError, "timedelta"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ModelCheckpoint(**kwargs)


def test_save_last_link_needs_a_local_folder(make_trainer, tiny_module_cls):
    callback = ModelCheckpoint(dirpath="memory://x/ckpts", save_last="link")  # refused at setup, as in Lightning
    with pytest.raises(ValueError, match="save_last='link'.* is only supported for local file paths"):
        callback.setup(make_trainer(), tiny_module_cls(), "fit")


def test_bad_dirpath_is_refused_at_construction(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="a file, not a folder"):
        ModelCheckpoint(dirpath=tmp_path / "file")
    with pytest.raises(ValueError, match="inside .*file.*a file"):
        ModelCheckpoint(dirpath=tmp_path / "file" / "sub")
    with pytest.raises(ValueError, match="non-empty folder path"):
        ModelCheckpoint(dirpath="bad\0name")
    assert ModelCheckpoint(dirpath="").dirpath is None  # Lightning: "" means not given
    assert ModelCheckpoint(dirpath=tmp_path / "new" / "deeper").dirpath == str(tmp_path / "new" / "deeper")


def test_dot_dot_filename_fails_before_any_training(make_trainer, tiny_module_cls, make_loader):
    """Issue #14 hole 7: the refusal comes from the constructor, so no epoch is trained for nothing."""
    module = tiny_module_cls()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="hidden"):
        fit(make_trainer, module, make_loader, ModelCheckpoint(filename=".."), max_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_resolve_best_gives_the_best_path_or_lightnings_errors(make_trainer, scored_module_cls, make_loader,
                                                               tmp_path):
    from callbacks.checkpoint_naming import resolve_best

    with pytest.raises(ValueError, match=r'ckpt_path="best"\)` is set but `ModelCheckpoint` is not configured\.'):
        resolve_best(make_trainer(), "test")
    callback = ModelCheckpoint(monitor="score", every_n_train_steps=1)
    trainer = make_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[callback])
    with pytest.raises(ValueError, match="not configured to save the best model"):
        resolve_best(trainer, "validate")
    trainer.fit(scored_module_cls(SCORES), make_loader())
    assert resolve_best(trainer, "test") == callback.best_model_path == str(
        tmp_path / "checkpoints" / "epoch=0-step=4.ckpt")
    fresh = scored_module_cls(SCORES)
    make_trainer(max_epochs=1).validate(fresh, make_loader(), ckpt_path=resolve_best(trainer))
    assert read_manifest(callback.best_model_path).global_step == 4


def test_state_dict_round_trip_and_other_dirpath(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path / "a", monitor="m", save_top_k=2)
    third = torch.tensor(0.1, dtype=torch.float64)  # not a float32 value: must come back bit-exact
    callback.best_k_models = {"p1": torch.tensor(1.0), "p2": torch.tensor(2.0)}
    callback._rerank(2)
    callback.last_model_path, callback.current_score = "p2", third
    state = callback.state_dict()
    # Scores are tensors (as in Lightning), detached copies: Kiln stores them in safetensors, without pickle.
    assert state["current_score"].dtype == torch.float64 and state["current_score"] is not third
    again = ModelCheckpoint(dirpath=tmp_path / "a", monitor="m", save_top_k=2)
    again.load_state_dict(state)
    assert (again.best_model_path, float(again.best_model_score), again.kth_best_model_path) == ("p1", 1.0, "p2")
    assert {k: float(v) for k, v in again.best_k_models.items()} == {"p1": 1.0, "p2": 2.0}
    assert torch.equal(again.current_score, third) and again.current_score.dtype == torch.float64
    older = ModelCheckpoint(dirpath=tmp_path / "a", monitor="m", save_top_k=2)  # scores saved as plain numbers
    older.load_state_dict({**state, "best_model_score": 1.0, "current_score": 0.5, "kth_value": 2.0,
                           "best_k_models": {"p1": 1.0, "p2": 2.0}})
    assert float(older.best_model_score) == 1.0 and float(older.kth_value) == 2.0 and float(older.current_score) == 0.5
    elsewhere = ModelCheckpoint(dirpath=tmp_path / "b", monitor="m", save_top_k=2)
    with pytest.warns(UserWarning, match="dirpath has changed"):
        elsewhere.load_state_dict(state)
    assert elsewhere.best_model_path == "p1" and elsewhere.best_k_models == {}


def test_to_yaml_writes_best_k_models(tmp_path):
    import yaml

    callback = ModelCheckpoint(dirpath=tmp_path, monitor="m", save_top_k=2)
    callback.best_k_models = {str(tmp_path / "a.ckpt"): torch.tensor(0.5)}
    callback.to_yaml()
    assert yaml.safe_load((tmp_path / "best_k_models.yaml").read_text()) == {str(tmp_path / "a.ckpt"): 0.5}


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
    callback = ModelCheckpoint(total_limit=2, every_n_train_steps=1, filename="{step}")
    with pytest.raises(OSError, match="No space left"):
        fit(make_trainer, module, make_loader, callback, max_epochs=1)
    monkeypatch.setattr(tensor_files, "write_safetensors", real_write)

    dirpath = tmp_path / "checkpoints"
    assert [os.path.basename(m.path) for m in list_checkpoints(str(dirpath))] == ["step=3.ckpt", "step=2.ckpt"]
    assert listing(str(dirpath)) == ["step=2.ckpt", "step=3.ckpt"], "the failed save left files behind"
    for name in ("step=2.ckpt", "step=3.ckpt"):
        verify_checkpoint(str(dirpath / name))
    # and the newest one resumes
    resumed = make_trainer(max_epochs=1)
    fresh = tiny_module_cls()
    resumed.fit(fresh, make_loader(), ckpt_path=str(dirpath / "step=3.ckpt"))
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
    assert listing(str(dirpath)) == [".keep", "epoch=0-step=5.ckpt"]


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
