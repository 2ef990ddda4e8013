"""Lightning's ModelCheckpoint behaviour, checked on Kiln the way a user porting from Lightning meets it.

Each test restates a behaviour Lightning's own test suite pins down (tests/tests_pytorch/checkpointing/
test_model_checkpoint.py, test_checkpoint_callback_frequency.py), written here with Kiln's
BoringModule and the Trainer arguments both frameworks share. Names are Lightning's file names; in Kiln
each is a checkpoint directory, read back with Kiln's reader instead of ``torch.load``.
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
from lightning_boring import Boring

from callbacks import ModelCheckpoint
from framework import Trainer
from framework.checkpoint import read_manifest, read_state
from framework.exceptions import MisconfigurationException


def trainer_for(tmp_path, callback: ModelCheckpoint, **kwargs: Any) -> Trainer:
    defaults = dict(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False, max_epochs=2)
    return Trainer(callbacks=[callback], **{**defaults, **kwargs})


def names(folder) -> set[str]:
    return set(os.listdir(folder))


def saved_state(path: str, callback: ModelCheckpoint) -> dict[str, Any]:
    """The callback's state as stored inside the checkpoint at ``path``."""
    return read_state(path, "trainer")["callbacks"][callback.state_key]


class Scripted(Boring):
    """Logs ``values[epoch]`` as ``name`` at the end of each validation (or training, ``in_training``) epoch."""

    def __init__(self, name: str, values: list[float], in_training: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name, self.values, self.in_training = name, values, in_training

    def on_validation_epoch_end(self) -> None:
        if not self.in_training:
            self.log(self.name, float(self.values[self.current_epoch]))

    def on_train_epoch_end(self) -> None:
        if self.in_training:
            self.log(self.name, float(self.values[self.current_epoch]))


# ---- construction --------------------------------------------------------------------------------------


def test_defaults_and_constants_are_lightnings(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path)
    assert (callback.monitor, callback.save_last, callback.save_top_k, callback.mode) == (None, None, 1, "min")
    assert callback.every_n_epochs == 1 and callback._every_n_train_steps == 0  # nothing given: every epoch
    assert (callback.verbose, callback.save_weights_only, callback.auto_insert_metric_name) == (False, False, True)
    assert (callback.CHECKPOINT_JOIN_CHAR, callback.CHECKPOINT_EQUALS_CHAR, callback.CHECKPOINT_NAME_LAST,
            callback.FILE_EXTENSION, callback.STARTING_VERSION) == ("-", "=", "last", ".ckpt", 1)
    assert callback.best_model_path == callback.last_model_path == callback.kth_best_model_path == ""
    assert callback.best_model_score is None and callback.current_score is None and callback.best_k_models == {}
    assert torch.isinf(callback.kth_value) and callback.kth_value > 0


def test_state_key_names_the_schedule_like_lightning():
    callback = ModelCheckpoint(monitor="val_loss", every_n_train_steps=5)
    assert callback.state_key == ("ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 5, "
                                  "'every_n_epochs': 0, 'train_time_interval': None}")


@pytest.mark.parametrize("kwargs, match", [
    (dict(save_top_k=-3), "save_top_k=-3"),
    (dict(save_top_k=3), r"save_top_k=3, monitor=None\) is not a valid"),
    (dict(every_n_epochs=-3), "every_n_epochs=-3"),
    (dict(every_n_train_steps=-3), "every_n_train_steps=-3"),
    (dict(every_n_train_steps=1, every_n_epochs=2), "Combination of parameters every_n_train_steps"),
    (dict(train_time_interval=timedelta(minutes=1), every_n_epochs=2), "Combination of parameters"),
    (dict(mode="unknown_option"), "`mode` can be .* but got unknown_option"),
])
def test_invalid_arguments_raise_at_construction(tmp_path, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):  # Lightning's name; a ValueError
        ModelCheckpoint(dirpath=tmp_path, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(save_top_k=-1), dict(save_top_k=0), dict(every_n_epochs=0),
                                    dict(every_n_train_steps=4, every_n_epochs=0),
                                    dict(every_n_train_steps=0, every_n_epochs=0, train_time_interval=timedelta(1))])
def test_valid_combinations_are_accepted(tmp_path, kwargs):
    ModelCheckpoint(dirpath=tmp_path, **kwargs)


def test_dirpath_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ModelCheckpoint(dirpath="~/ckpts").dirpath == str(tmp_path / "ckpts")


# ---- names ---------------------------------------------------------------------------------------------


def test_format_checkpoint_name(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path)
    assert callback._format_checkpoint_name("", {"epoch": 3, "step": 2}) == "epoch=3-step=2"
    assert callback._format_checkpoint_name(None, {"epoch": 3, "step": 2}, prefix="test") == "test-epoch=3-step=2"
    assert callback._format_checkpoint_name("{epoch:03d}-{acc}", {"epoch": 3, "acc": 0.03}) == "epoch=003-acc=0.03"
    assert callback._format_checkpoint_name("{epoch:03d}-{epoch_test:03d}", {"epoch": 3, "epoch_test": 3}) == \
        "epoch=003-epoch_test=003"  # a field whose name extends another's
    assert callback._format_checkpoint_name("epoch={epoch:03d}-acc={val/acc}", {"epoch": 3, "val/acc": 0.03},
                                            auto_insert_metric_name=False) == "epoch=003-acc=0.03"
    callback.CHECKPOINT_JOIN_CHAR, callback.CHECKPOINT_EQUALS_CHAR = "@", ":"
    assert callback._format_checkpoint_name("{epoch},{acc:.5f}", {"epoch": 3, "acc": 0.03}, prefix="t") == \
        "t@epoch:3,acc:0.03000"
    assert ModelCheckpoint(dirpath=None).format_checkpoint_name({"epoch": 3, "step": 2}) == "epoch=3-step=2.ckpt"
    named = ModelCheckpoint(dirpath=tmp_path, filename="name")
    assert named.format_checkpoint_name({}, ver=3) == str(tmp_path / "name-v3.ckpt")
    assert named.format_checkpoint_name({}, prefix="test") == str(tmp_path / "test-name.ckpt")
    assert ModelCheckpoint(filename="{missing:d}").format_checkpoint_name({}) == "missing=0.ckpt"
    assert ModelCheckpoint(filename="{epoch}-{val_loss:.2f}").format_checkpoint_name(
        {"epoch": 2, "val_loss": torch.tensor(0.123456)}) == "epoch=2-val_loss=0.12.ckpt"


def test_file_extension_can_be_changed(tmp_path):
    class Other(ModelCheckpoint):
        FILE_EXTENSION = ".tpkc"

    trainer_for(tmp_path, Other(dirpath=tmp_path / "c", save_last=True), max_steps=1).fit(Boring())
    assert names(tmp_path / "c") == {"epoch=0-step=1.tpkc", "last.tpkc"}


# ---- what gets saved and kept ------------------------------------------------------------------------------


def test_every_epoch_by_default_keeping_the_newest(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path)
    trainer_for(tmp_path, callback, max_epochs=3, limit_train_batches=4, limit_val_batches=1).fit(Boring())
    assert names(tmp_path) == {"epoch=2-step=12.ckpt"}
    assert callback.best_model_path == str(tmp_path / "epoch=2-step=12.ckpt")  # no monitor: the newest
    assert callback.best_model_score is None and callback.best_k_models == {}


@pytest.mark.parametrize("every_n_epochs", [0, 1, 2, 3])
def test_every_n_epochs(tmp_path, every_n_epochs):
    callback = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=every_n_epochs)
    trainer_for(tmp_path, callback, max_epochs=5, limit_train_batches=1, limit_val_batches=1).fit(Boring())
    expected = {f"epoch={e}.ckpt" for e in range(5) if every_n_epochs and (e + 1) % every_n_epochs == 0}
    assert names(tmp_path) == expected


def test_every_n_train_steps(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_epochs=0, every_n_train_steps=4,
                               save_top_k=-1)
    trainer_for(tmp_path, callback, max_epochs=2, limit_train_batches=10).fit(Boring())
    assert names(tmp_path) == {f"step={s}.ckpt" for s in range(4, 21, 4)}


def test_train_time_interval(tmp_path, monkeypatch):
    """Each batch 'takes' 7 s by a fake clock; a save every minute gives one per 9 batches."""
    from types import SimpleNamespace

    import callbacks.checkpoint as module

    clock = iter(range(0, 10_000, 7))
    monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    callback = ModelCheckpoint(dirpath=tmp_path, filename="{step}", train_time_interval=timedelta(minutes=1),
                               save_top_k=-1)
    trainer_for(tmp_path, callback, max_epochs=1).fit(Boring())  # 32 batches
    # on_train_start reads t=0; batch k ends at 7k s: saves at the first batch >= 60 s after the previous save
    assert names(tmp_path) == {"step=9.ckpt", "step=18.ckpt", "step=27.ckpt"}


def test_top_k_all_with_monitor_epoch(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", monitor="epoch", mode="max", save_top_k=-1)
    trainer_for(tmp_path, callback, max_epochs=3, limit_train_batches=2, limit_val_batches=1).fit(Boring())
    assert callback.best_model_path == str(tmp_path / "epoch=2.ckpt") and callback.best_model_score == 2
    assert set(callback.best_k_models) == {str(tmp_path / f"epoch={i}.ckpt") for i in range(3)}
    assert names(tmp_path) == {f"epoch={i}.ckpt" for i in range(3)}
    assert callback.kth_best_model_path == str(tmp_path / "epoch=0.ckpt")


def test_top_k_zero_saves_only_last_as_a_full_checkpoint(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last="link")
    trainer_for(tmp_path, callback, limit_train_batches=2, limit_val_batches=1).fit(Boring())
    assert names(tmp_path) == {"last.ckpt"}
    assert callback.best_model_path == "" and callback.best_k_models == {} and callback.kth_best_model_path == ""
    assert not os.path.islink(tmp_path / "last.ckpt")  # nothing to link to
    assert read_manifest(str(tmp_path / "last.ckpt")).global_step == 4


@pytest.mark.parametrize("save_last", [True, "link"])
def test_save_last_keeps_one_last_checkpoint(tmp_path, save_last):
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, save_last=save_last)
    callback.CHECKPOINT_NAME_LAST = "last-{epoch}"
    trainer_for(tmp_path, callback, max_epochs=3, limit_train_batches=10, limit_val_batches=2).fit(Boring())
    assert callback.last_model_path == str(tmp_path / "last-epoch=2.ckpt")
    assert names(tmp_path) == {"epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "epoch=2-step=30.ckpt",
                               "last-epoch=2.ckpt"}
    assert os.path.islink(tmp_path / "last-epoch=2.ckpt") is (save_last == "link")
    assert os.path.realpath(tmp_path / "last-epoch=2.ckpt") == (
        callback._last_checkpoint_saved if save_last == "link" else str(tmp_path / "last-epoch=2.ckpt"))
    if save_last is True:  # a link's target was saved before the link moved to it
        assert saved_state(callback.last_model_path, callback)["last_model_path"] == callback.last_model_path


def test_save_last_without_monitor_and_every_checkpoint(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, save_last=True)
    trainer_for(tmp_path, callback, limit_train_batches=10, limit_val_batches=2).fit(Boring())
    assert callback.best_model_path == str(tmp_path / "epoch=1-step=20.ckpt")
    assert callback.last_model_path == str(tmp_path / "last.ckpt")
    assert names(tmp_path) == {"epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "last.ckpt"}


def test_save_last_gets_a_version_in_a_second_run(tmp_path):
    for _ in range(2):
        callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True)
        trainer_for(tmp_path, callback, limit_train_batches=1, limit_val_batches=0).fit(Boring())
    assert names(tmp_path) == {"last.ckpt", "last-v1.ckpt"}


def test_versions_after_a_rerun_and_without_the_counter(tmp_path):
    for run in range(2):
        callback = ModelCheckpoint(dirpath=tmp_path / "counted", save_top_k=-1, monitor="epoch", filename="{epoch}")
        trainer_for(tmp_path, callback, limit_train_batches=1, limit_val_batches=1).fit(Boring())
        want = {"epoch=0-v1.ckpt", "epoch=1-v1.ckpt"} if run else {"epoch=0.ckpt", "epoch=1.ckpt"}
        assert {os.path.basename(p) for p in callback.best_k_models} == want
        plain = ModelCheckpoint(dirpath=tmp_path / "plain", save_top_k=-1, monitor="epoch", filename="{epoch}",
                                save_last=True, enable_version_counter=False)
        trainer_for(tmp_path, plain, limit_train_batches=1, limit_val_batches=1).fit(Boring())
    assert names(tmp_path / "counted") == {"epoch=0.ckpt", "epoch=1.ckpt", "epoch=0-v1.ckpt", "epoch=1-v1.ckpt"}
    assert names(tmp_path / "plain") == {"epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"}


def test_none_monitor_does_not_alternate_names(tmp_path):
    seen = []

    class Lister(Boring):
        def on_train_epoch_start(self) -> None:
            seen.append(sorted(os.listdir(tmp_path)))

    callback = ModelCheckpoint(dirpath=tmp_path, save_top_k=1, filename="model")
    trainer_for(tmp_path, callback, max_epochs=3, limit_train_batches=1, limit_val_batches=0).fit(Lister())
    assert seen == [[], ["model.ckpt"], ["model.ckpt"]]


# ---- scores --------------------------------------------------------------------------------------------------


def test_scores_names_and_saved_state_per_epoch(tmp_path):
    values = [0.9, 0.3, 0.6]
    callback = ModelCheckpoint(dirpath=tmp_path, filename="{val_log:.4f}-{epoch}", monitor="val_log", save_top_k=-1)
    trainer_for(tmp_path, callback, max_epochs=3, limit_train_batches=5, limit_val_batches=2).fit(
        Scripted("val_log", values))
    assert names(tmp_path) == {f"val_log={v:.4f}-epoch={e}.ckpt" for e, v in enumerate(values)}
    for epoch, value in enumerate(values):
        path = str(tmp_path / f"val_log={value:.4f}-epoch={epoch}.ckpt")
        assert read_manifest(path).global_step == 5 * (epoch + 1)
        state = saved_state(path, callback)
        assert state["monitor"] == "val_log" and state["dirpath"] == str(tmp_path)
        assert state["current_score"] == pytest.approx(value)
        assert torch.equal(state["current_score"], torch.tensor(value))  # a tensor, as logged (Lightning's form)
    assert callback.best_model_path.endswith("val_log=0.3000-epoch=1.ckpt")
    assert float(callback.best_model_score) == pytest.approx(0.3)


def test_training_metric_is_ranked_without_validation(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="train_log", save_top_k=2, filename="{epoch}")
    trainer_for(tmp_path, callback, max_epochs=3, limit_train_batches=2, limit_val_batches=0).fit(
        Scripted("train_log", [3.0, 1.0, 2.0], in_training=True))
    assert names(tmp_path) == {"epoch=1.ckpt", "epoch=2.ckpt"}
    assert float(callback.kth_value) == 2.0


def test_current_score_and_nan(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path / "a", save_top_k=3, monitor="foo")
    trainer_for(tmp_path, callback, max_epochs=3, limit_train_batches=1, limit_val_batches=1).fit(
        Scripted("foo", [0.1, 0.2, 0.3]))
    assert float(callback.current_score) == pytest.approx(0.3)
    for mode, inf in (("min", math.inf), ("max", -math.inf)):
        callback = ModelCheckpoint(dirpath=tmp_path / mode, save_top_k=1, monitor="foo", mode=mode)
        trainer_for(tmp_path, callback, max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(
            Scripted("foo", [math.nan]))
        assert callback.best_model_score == inf and callback.current_score == inf


@pytest.mark.parametrize("mode, values, best", [("min", [math.nan, 8, 7, 5], 5), ("max", [math.nan, 5, 7, 8], 8)])
def test_nan_as_the_first_score_is_replaced(tmp_path, mode, values, best):
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="abc", mode=mode, save_top_k=1, filename="{epoch}")
    trainer_for(tmp_path, callback, max_epochs=4, limit_train_batches=1, limit_val_batches=1).fit(
        Scripted("abc", values))
    assert callback.best_model_score == best and names(tmp_path) == {"epoch=3.ckpt"}


def test_missing_monitor_raises_once_validation_ran(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, monitor="nope")
    with pytest.raises(MisconfigurationException, match=r"could not find the monitored key.*HINT: Did you call `log\('nope', value\)`"):
        trainer_for(tmp_path, callback, limit_train_batches=1, limit_val_batches=1).fit(Boring())


# ---- state and resume -----------------------------------------------------------------------------------------


def test_state_restores_only_best_model_path_from_another_dirpath(tmp_path):
    written = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, save_last=True)
    written.best_model_path, written.best_model_score = "epoch=10-step=1436.ckpt", torch.tensor(2.246)
    written.best_k_models = {"epoch=10-step=1436.ckpt": torch.tensor(2.246)}
    written.kth_best_model_path, written.kth_value = "epoch=10-step=1436.ckpt", torch.tensor(2.246)
    written.last_model_path = "last2245.ckpt"
    state = written.state_dict()
    restored = ModelCheckpoint(dirpath=tmp_path / "restore", save_top_k=-1, save_last=True)
    with pytest.warns(UserWarning, match="The dirpath has changed from"):
        restored.load_state_dict(state)
    assert restored.best_model_path == "epoch=10-step=1436.ckpt"
    assert restored.best_model_score is None and restored.best_k_models == {} and restored.last_model_path == ""


def test_resuming_elsewhere_keeps_the_old_folders_checkpoints(tmp_path):
    kwargs = dict(filename="{step}", monitor="step", mode="max", save_last=True, save_top_k=2, every_n_train_steps=1)
    trainer_for(tmp_path, ModelCheckpoint(**kwargs), max_epochs=1, limit_train_batches=3,
                limit_val_batches=0).fit(Boring())
    assert names(tmp_path / "checkpoints") == {"last.ckpt", "step=2.ckpt", "step=3.ckpt"}
    trainer = trainer_for(tmp_path, ModelCheckpoint(dirpath=tmp_path / "new", **kwargs), max_epochs=2,
                          limit_train_batches=3, limit_val_batches=0)
    trainer.fit(Boring(), ckpt_path=str(tmp_path / "checkpoints" / "step=2.ckpt"))
    assert names(tmp_path / "checkpoints") == {"last.ckpt", "step=2.ckpt", "step=3.ckpt"}
    assert names(tmp_path / "new") == {"last.ckpt", "step=5.ckpt", "step=6.ckpt"}


def test_best_and_last_paths_resume_and_load(tmp_path):
    callback = ModelCheckpoint(monitor="val_loss", save_last=True)
    trainer = trainer_for(tmp_path, callback, max_epochs=2, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(Boring())
    for path in (callback.best_model_path, callback.last_model_path):
        resumed = trainer_for(tmp_path / "again", ModelCheckpoint(dirpath=tmp_path / "again"), max_epochs=3,
                              limit_train_batches=3, limit_val_batches=2)
        resumed.fit(Boring(), ckpt_path=path)
        assert resumed.global_step == 9
    if hasattr(Boring, "load_from_checkpoint"):
        loaded = Boring.load_from_checkpoint(callback.best_model_path)
        assert isinstance(loaded, Boring)


def test_save_on_exception(tmp_path):
    class Troubled(Boring):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    callback = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_on_exception=True)
    with pytest.raises(RuntimeError, match="boom"):
        trainer_for(tmp_path, callback, limit_train_batches=10).fit(Troubled())
    assert names(tmp_path) == {"step=3.ckpt"}


def test_no_saves_outside_fit_and_no_repeat_at_the_same_step(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = trainer_for(tmp_path, callback, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(Boring())
    before = names(tmp_path)
    trainer.validate(Boring())
    trainer.test(Boring())
    assert names(tmp_path) == before == {"step=1.ckpt", "step=2.ckpt"}
    time.sleep(0)  # nothing pending


def test_save_weights_only_keeps_the_model_and_drops_training_state(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    module = Boring()
    trainer_for(tmp_path, callback, max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(module)
    manifest = read_manifest(callback.best_model_path)
    assert manifest.metadata["weights_only"] is True and manifest.global_step == 2
    state = read_state(callback.best_model_path, "trainer")
    assert not state.get("optimizers") and "callbacks" not in state and "schedulers" not in state
    fresh = Boring()
    trainer_for(tmp_path / "eval", ModelCheckpoint(dirpath=tmp_path / "eval"), limit_val_batches=1).validate(
        fresh, ckpt_path=callback.best_model_path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), module.state_dict().values()))


def test_link_checkpoint_replaces_files_links_and_folders_and_falls_back_to_a_copy(tmp_path, monkeypatch):
    trainer = Trainer(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    (tmp_path / "a").touch()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").write_text("a plain file")
    (tmp_path / "dir_link").mkdir()
    for target, link in (("a", "link"), ("b", "link"), ("b", "dir_link"), ("a", "dir_link")):
        ModelCheckpoint._link_checkpoint(trainer, filepath=str(tmp_path / target), linkpath=str(tmp_path / link))
        assert os.path.islink(tmp_path / link) and os.readlink(tmp_path / link) == target  # relative
    monkeypatch.setattr(os, "symlink", lambda *a, **k: (_ for _ in ()).throw(OSError("no privilege")))
    ModelCheckpoint._link_checkpoint(trainer, filepath=str(tmp_path / "a"), linkpath=str(tmp_path / "copied"))
    assert os.path.isfile(tmp_path / "copied") and not os.path.islink(tmp_path / "copied")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging leftovers


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("false", False), ("link", "link")])
def test_save_last_parses_from_the_command_line(value, expected):
    from inspect import signature

    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--a", type=signature(ModelCheckpoint).parameters["save_last"].annotation)
    assert parser.parse_args(["--a", value]).a == expected


def test_default_saves_call_trainer_save_checkpoint_like_lightning(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, ModelCheckpoint(), max_epochs=3, limit_train_batches=5, limit_val_batches=5)
    calls = []
    real = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda *args, **kwargs: (calls.append((args, kwargs)),
                                                                             real(*args, **kwargs)))
    trainer.fit(Boring())
    folder = tmp_path / "checkpoints"
    assert calls == [((str(folder / f"epoch={e}-step={5 * (e + 1)}.ckpt"), False), {}) for e in range(3)]
    assert names(folder) == {"epoch=2-step=15.ckpt"}
