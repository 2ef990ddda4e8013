"""Trainer argument checks (every refusal names the argument, the value and the fix) and callback assembly."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from callbacks import Callback, GradientAccumulation
from callbacks.progress import ProgressBar
from callbacks.rng import RNGCapture
from framework import Trainer, TrainModule
from framework.arguments import DEFAULT_MAX_EPOCHS, val_every_batches

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)


def trainer(**kwargs):
    return Trainer(**{"max_epochs": 1, **QUIET, **kwargs})


# ---- bad values: (argument, value, words the message must contain) ------------------------------------
BAD_VALUES = [
    ("max_epochs", -2, ["max_epochs=-2", "int >= 0"]),
    ("max_epochs", 1.5, ["max_epochs=1.5", "int >= 0"]),
    ("max_epochs", True, ["max_epochs=True"]),
    ("max_steps", -5, ["max_steps=-5", "-1 for no step limit"]),
    ("max_steps", "10", ["max_steps='10'"]),
    ("gradient_clip_val", -1.0, ["gradient_clip_val=-1.0", "finite number >= 0", "None to disable"]),
    ("gradient_clip_val", math.inf, ["gradient_clip_val=inf"]),
    ("gradient_clip_val", math.nan, ["gradient_clip_val=nan"]),
    ("gradient_clip_val", "1", ["gradient_clip_val='1'"]),
    ("gradient_clip_algorithm", "l2", ["gradient_clip_algorithm='l2'", "'norm'", "'value'"]),
    ("gradient_clip_algorithm", "Norm", ["gradient_clip_algorithm='Norm'", "'norm'"]),
    ("log_every_n_steps", -1, ["log_every_n_steps=-1", "int >= 1"]),
    ("log_every_n_steps", 2.0, ["log_every_n_steps=2.0", "int >= 1"]),
    ("check_val_every_n_epoch", 0, ["check_val_every_n_epoch=0", "int >= 1"]),
    ("val_check_interval", 0, ["val_check_interval=0", ">= 1 batches"]),
    ("val_check_interval", 1.5, ["val_check_interval=1.5", "fraction in (0, 1]"]),
    ("val_check_interval", 0.0, ["val_check_interval=0.0", "fraction in (0, 1]"]),
    ("val_check_interval", "1", ["val_check_interval='1'"]),
    ("limit_train_batches", -1, ["limit_train_batches=-1", "int must be >= 0"]),
    ("limit_val_batches", 1.5, ["limit_val_batches=1.5", "fraction in [0, 1]"]),
    ("limit_test_batches", "all", ["limit_test_batches='all'", "None for all"]),
    ("limit_predict_batches", True, ["limit_predict_batches=True"]),
    ("accumulate_grad_batches", 0, ["accumulate_grad_batches=0", "int >= 1"]),
    ("accumulate_grad_batches", -3, ["accumulate_grad_batches=-3", "int >= 1"]),
    ("accumulate_grad_batches", {0: 0}, ["accumulate_grad_batches={0: 0}", "{epoch: k}"]),
    ("accumulate_grad_batches", {-1: 2}, ["accumulate_grad_batches={-1: 2}"]),
    ("precision", "fp16", ["precision='fp16'", "16-mixed"]),
    ("precision", "8-true", ["precision='8-true'", "32-true"]),
    ("strategy", "horovod", ["strategy='horovod'", "single_device"]),
    ("accelerator", "quantum", ["accelerator='quantum'", "cpu"]),
]


@pytest.mark.parametrize(("argument", "value", "words"), BAD_VALUES,
                         ids=[f"{a}={v!r}" for a, v, _ in BAD_VALUES])
def test_bad_argument_is_refused_with_a_clear_message(argument, value, words):
    with pytest.raises((ValueError, TypeError)) as info:
        trainer(**{argument: value})
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


@pytest.mark.parametrize("value", [True, 1.0, "2", None, []])
def test_accumulate_grad_batches_of_wrong_type_is_a_type_error(value):
    with pytest.raises(TypeError, match="accumulate_grad_batches=.*use an int >= 1"):
        trainer(accumulate_grad_batches=value)


# ---- max_epochs / max_steps defaults --------------------------------------------------------------------
def test_neither_limit_warns_and_defaults_to_1000_epochs():
    with pytest.warns(UserWarning, match="Neither max_epochs nor max_steps was set.*1000 epochs"):
        t = Trainer(**QUIET)
    assert t.max_epochs == DEFAULT_MAX_EPOCHS == 1000 and t.max_steps == -1


@pytest.mark.parametrize(("max_epochs", "max_steps", "expected"), [
    (None, 7, (math.inf, 7)), (3, -1, (3, -1)), (-1, 5, (math.inf, 5)), (2, 0, (2, 0)), (0, -1, (0, -1))])
def test_explicit_limits_do_not_warn(max_epochs, max_steps, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = Trainer(max_epochs=max_epochs, max_steps=max_steps, **QUIET)
    assert (t.max_epochs, t.max_steps) == expected


def test_gradient_clip_val_zero_disables_clipping():
    assert trainer(gradient_clip_val=0).gradient_clip_val is None
    assert trainer(gradient_clip_val=2).gradient_clip_val == 2.0


@pytest.mark.parametrize(("value", "num_batches", "expected"), [
    (None, 10, None), (1.0, 10, None), (0.5, 10, 5), (0.25, 10, 2), (0.01, 10, 1), (3, 10, 3), (10, 10, 10), (3, None, 3)])
def test_val_every_batches(value, num_batches, expected):
    assert val_every_batches(value, num_batches) == expected


def test_fractional_val_check_interval_needs_a_length():
    with pytest.raises(ValueError, match=r"val_check_interval=0\.5 is a fraction.*no length; use an int"):
        val_every_batches(0.5, None)


# ---- callbacks --------------------------------------------------------------------------------------
class Mine(Callback):
    pass


class Other(Callback):
    pass


def test_default_callbacks_and_user_order():
    first, second = Other(), Mine()
    t = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, callbacks=[first, second])
    kinds = [type(cb) for cb in t.callbacks]
    assert kinds[0] is RNGCapture  # restores RNG before anything else runs at epoch start
    assert kinds[1:3] == [Other, Mine]  # user order kept
    assert GradientAccumulation in kinds and ProgressBar in kinds


def test_single_callback_and_user_rng_capture_are_not_duplicated():
    rng = RNGCapture()
    t = trainer(callbacks=[Mine(), rng])
    assert [type(cb) for cb in t.callbacks].count(RNGCapture) == 1 and t.callbacks[0] is rng
    assert type(trainer(callbacks=Mine()).callbacks[1]) is Mine


def test_accumulation_from_argument_or_callback():
    t = trainer(accumulate_grad_batches=3)
    assert t.accumulation.factor(0) == 3
    given = GradientAccumulation({0: 1, 2: 4})
    t = trainer(callbacks=[given])
    assert t.accumulation is given and t.accumulation.factor(5) == 4


def test_accumulation_in_two_places_is_refused():
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 was given together with a GradientAccumulation"):
        trainer(accumulate_grad_batches=2, callbacks=[GradientAccumulation(3)])


def test_enable_checkpointing_installs_one_model_checkpoint(tmp_path):
    from callbacks import ModelCheckpoint

    t = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    assert isinstance(t.checkpoint_callback, ModelCheckpoint)
    mine = ModelCheckpoint(total_limit=2)
    t = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[mine])
    assert t.checkpoint_callback is mine and [type(cb) for cb in t.callbacks].count(ModelCheckpoint) == 1
    assert trainer().checkpoint_callback is None


def test_checkpointing_contradiction_is_refused():
    from callbacks import ModelCheckpoint

    with pytest.raises(ValueError, match="`enable_checkpointing=False` but found `ModelCheckpoint`"):
        trainer(callbacks=[ModelCheckpoint()])


def test_progress_bar_contradiction_is_refused():
    with pytest.raises(ValueError, match="`enable_progress_bar=False` but found `ProgressBar`"):
        trainer(callbacks=[ProgressBar()])


@pytest.mark.parametrize("bad", [object(), "EarlyStopping", [Mine(), lambda *a: None]])
def test_callbacks_of_wrong_type(bad):
    with pytest.raises(TypeError, match="callbacks"):
        trainer(callbacks=bad)


# ---- modules given to the entry points ---------------------------------------------------------------------
class NoStep(TrainModule):
    def configure_optimizers(self):
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_fit_names_missing_training_step(make_loader):
    with pytest.raises(TypeError, match=r"NoStep must define training_step\(\) for trainer.fit"):
        trainer().fit(NoStep(), make_loader())


def test_fit_refuses_plain_nn_module(make_loader):
    with pytest.raises(TypeError, match="needs a framework.TrainModule, got Linear"):
        trainer().fit(torch.nn.Linear(4, 1), make_loader())


@pytest.mark.parametrize(("stage", "step"), [("validate", "validation_step"), ("test", "test_step")])
def test_evaluation_names_missing_step(make_loader, stage, step):
    with pytest.raises(TypeError, match=rf"trainer.{stage}\(\) needs NoStep.{step}"):
        getattr(trainer(), stage)(NoStep(), make_loader())


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_without_any_module(stage):
    with pytest.raises(ValueError, match=rf"trainer.{stage}\(\) needs a model"):
        getattr(trainer(), stage)()
