"""Input fuzzing: whatever a user passes or a disk holds, Kiln ends in success or a documented exception.

Documented means ``ValueError``/``TypeError`` for bad arguments and return values (with a message naming what
was wrong), ``CheckpointError`` (a ``RuntimeError``) for checkpoints. Never an ``AttributeError``, ``KeyError``,
``IndexError`` or other internal error, never a hang, and never a change to an earlier checkpoint. Driven by
hypothesis: Trainer arguments (construction and short fits), ``configure_optimizers`` return shapes,
``training_step`` return values, and checkpoint directories with truncated, byte-flipped, missing, replaced
and foreign files.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from callbacks import Callback, ModelCheckpoint
from framework import Trainer
from framework.checkpoint import CheckpointError, list_checkpoints

DOCUMENTED = (ValueError, TypeError, CheckpointError)
def fuzz(max_examples: int) -> settings:
    max_examples *= int(os.environ.get("KILN_FUZZ_SCALE", "1"))
    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def parts():
    """(TinyModule, loader factory) from tests/conftest.py (by path: "conftest" may name another directory's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_kiln_tests_conftest", Path(__file__).with_name("conftest.py"))
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    return shared.TinyModule, lambda n=12, batch_size=4: DataLoader(shared.random_dataset(n), batch_size=batch_size)


def ends_documented(run, *names: str) -> BaseException | None:
    """Run ``run()``; return None on success, the exception if it is documented, else fail with it.

    A ValueError/TypeError must name one of ``names`` (the argument or hook at fault) when they are given.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run()
    except DOCUMENTED as exc:
        if names and not isinstance(exc, CheckpointError):
            assert any(name in str(exc) for name in names), f"{type(exc).__name__} names none of {names}: {exc}"
        return exc
    return None


# ---- Trainer arguments -----------------------------------------------------------------------------------------

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 6), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["", "auto", "cpu", "gpu", "cuda", "mps", "32", "16-mixed", "bf16-true", "64-true", "ddp",
                     "single_device", "fsdp", "norm", "value", "checkpoint", "exit", "skip", "stop", "nope"]),
    st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.integers(-1, 3), st.integers(-1, 3), max_size=2),
    st.builds(object),
)
TRAINER_ARGS = ["accelerator", "strategy", "devices", "num_nodes", "precision", "max_epochs", "max_steps",
                "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "val_check_interval",
                "check_val_every_n_epoch", "limit_train_batches", "limit_val_batches", "limit_test_batches",
                "limit_predict_batches", "log_every_n_steps", "enable_checkpointing", "enable_progress_bar",
                "even_batches", "use_distributed_sampler", "deterministic", "on_preempt", "nan_policy", "callbacks",
                "logger", "resume"]


@fuzz(150)
@given(st.dictionaries(st.sampled_from(TRAINER_ARGS), ANY_VALUE, max_size=4))
def test_trainer_arguments_are_accepted_or_refused_by_name(tmp_path, kwargs):
    try:
        error = ends_documented(lambda: Trainer(default_root_dir=str(tmp_path), **kwargs), *kwargs)
        assert error is None or type(error) in (ValueError, TypeError), error
    finally:
        torch.use_deterministic_algorithms(False)


FIT_ARGS = {
    "max_epochs": st.one_of(st.none(), st.integers(-1, 2)),
    "max_steps": st.integers(-1, 5),
    "accumulate_grad_batches": st.one_of(st.integers(-1, 4), st.dictionaries(st.integers(-1, 2), st.integers(-1, 3),
                                                                              max_size=2)),
    "gradient_clip_val": st.one_of(st.none(), st.floats(-1, 2), st.just(math.nan)),
    "gradient_clip_algorithm": st.sampled_from(["norm", "value", "max"]),
    "val_check_interval": st.one_of(st.none(), st.integers(0, 4), st.floats(0, 1.5)),
    "check_val_every_n_epoch": st.one_of(st.none(), st.integers(0, 2)),
    "limit_train_batches": st.one_of(st.none(), st.integers(-1, 4), st.floats(0, 1)),
    "limit_val_batches": st.one_of(st.none(), st.integers(0, 3), st.floats(0, 1)),
    "log_every_n_steps": st.integers(0, 3),
    "precision": st.sampled_from(["32-true", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "8-true"]),
    "nan_policy": st.sampled_from(["ignore", "skip", "stop", "bogus"]),
    "enable_checkpointing": st.booleans(),
    "deterministic": st.booleans(),
}


@fuzz(60)
@given(st.fixed_dictionaries({}, optional=FIT_ARGS))
def test_short_fits_with_fuzzed_arguments_train_or_refuse(parts, kwargs):
    TinyModule, loader = parts
    with tempfile.TemporaryDirectory() as root:
        kwargs.setdefault("max_epochs", 1)
        if kwargs["max_epochs"] in (None, -1) and kwargs.get("max_steps", -1) == -1:
            kwargs["max_steps"] = 3  # keep it short

        def fit() -> None:
            trainer = Trainer(default_root_dir=root, logger=False, enable_progress_bar=False, **kwargs)
            trainer.fit(TinyModule(), loader(), loader(8))

        try:
            ends_documented(fit, *kwargs)
        finally:
            torch.use_deterministic_algorithms(False)


# ---- configure_optimizers return shapes ----------------------------------------------------------------------


def optimizer_returns(module: torch.nn.Module) -> st.SearchStrategy:
    """Strategies for what configure_optimizers may return: valid shapes and their near misses."""

    def sgd(_: Any = None) -> torch.optim.Optimizer:
        return torch.optim.SGD(module.parameters(), lr=0.1)

    def scheduler(kind: str) -> Any:
        optimizer = sgd() if kind == "foreign" else module._fuzz_optimizer
        if kind == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)

    module._fuzz_optimizer = sgd()
    optimizer = st.one_of(st.just(module._fuzz_optimizer), st.builds(sgd), st.sampled_from([None, 3, "sgd"]))
    sched = st.builds(scheduler, st.sampled_from(["own", "foreign", "plateau"]))
    config = st.fixed_dictionaries(
        {"scheduler": st.one_of(sched, st.none(), st.just(1))},
        optional={"interval": st.sampled_from(["step", "epoch", "batch", None]), "frequency": st.integers(-1, 2),
                  "monitor": st.sampled_from(["train_loss", "nope"]), "strict": st.booleans(), "extra": st.none()})
    return st.one_of(
        optimizer,
        st.lists(optimizer, max_size=3),
        st.tuples(st.lists(optimizer, max_size=2), st.lists(st.one_of(sched, config), max_size=2)),
        st.fixed_dictionaries({"optimizer": optimizer},
                              optional={"lr_scheduler": st.one_of(sched, config, st.none()), "bogus": st.none()}),
        st.lists(st.fixed_dictionaries({"optimizer": optimizer}, optional={"lr_scheduler": sched}), max_size=2),
        st.tuples(optimizer), st.just({}), st.just(()),
    )


@fuzz(80)
@given(st.data())
def test_configure_optimizers_shapes_train_or_refuse(parts, data):
    TinyModule, loader = parts
    module = TinyModule()
    returned = data.draw(optimizer_returns(module))
    module.configure_optimizers = lambda: returned
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(default_root_dir=root, max_steps=2, logger=False, enable_progress_bar=False,
                          enable_checkpointing=False)
        error = ends_documented(lambda: trainer.fit(module, loader()), "configure_optimizers", "lr_scheduler",
                                "optimizer", "scheduler", "ReduceLROnPlateau", "monitor")
    if error is None:
        assert trainer.optimizers and trainer.global_step == 2


# ---- training_step return values -------------------------------------------------------------------------------

STEP_RESULTS = st.sampled_from([
    "loss", "loss_dict", "loss_dict_extra", "none", "dict_none", "dict_no_loss", "float", "int", "str", "list",
    "tuple", "vector", "matrix_1x1", "detached", "int_tensor", "nan", "inf", "bool_tensor", "dict_float",
])


def step_result(kind: str, loss: torch.Tensor) -> Any:
    return {
        "loss": loss, "loss_dict": {"loss": loss}, "loss_dict_extra": {"loss": loss, "acc": 0.5}, "none": None,
        "dict_none": {"loss": None}, "dict_no_loss": {"acc": loss}, "float": 0.5, "int": 1, "str": "loss",
        "list": [loss], "tuple": (loss,), "vector": loss.expand(3), "matrix_1x1": loss.reshape(1, 1),
        "detached": loss.detach(), "int_tensor": torch.tensor(1), "nan": loss * math.nan, "inf": loss * math.inf,
        "bool_tensor": torch.tensor(True), "dict_float": {"loss": 0.5},
    }[kind]


@fuzz(60)
@given(st.lists(STEP_RESULTS, min_size=1, max_size=4), st.sampled_from(["ignore", "skip"]), st.integers(1, 2))
def test_training_step_results_train_or_refuse(parts, kinds, nan_policy, accumulate):
    TinyModule, loader = parts

    class Fuzzed(TinyModule):
        def training_step(self, batch, batch_idx):
            return step_result(kinds[batch_idx % len(kinds)], super().training_step(batch, batch_idx))

    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(default_root_dir=root, max_epochs=1, logger=False, enable_progress_bar=False,
                          enable_checkpointing=False, nan_policy=nan_policy, accumulate_grad_batches=accumulate)
        module = Fuzzed()
        error = ends_documented(lambda: trainer.fit(module, loader()), "training_step")
    if error is None and nan_policy == "skip":
        assert all(torch.isfinite(p).all() for p in module.parameters())


# ---- checkpoint files ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, parts) -> str:
    """A run's checkpoint folder with two checkpoints, step=2 (older) and step=3 (newest)."""
    TinyModule, loader = parts
    root = tmp_path_factory.mktemp("pristine")
    callback = ModelCheckpoint(every_n_train_steps=1, save_top_k=-1, filename="{step}", total_limit=2)
    callback.FILE_EXTENSION = ""  # plain "step=N" directory names (Lightning's documented customisation)
    Trainer(default_root_dir=str(root), max_epochs=1, logger=False, enable_progress_bar=False,
            callbacks=[callback]).fit(TinyModule(), loader())
    dirpath = str(root / "checkpoints")
    assert sorted(os.listdir(dirpath)) == ["step=2", "step=3"]
    return dirpath


FILES = ["manifest.json", "model.safetensors", "model.json", "trainer.safetensors", "trainer.json",
         "rank-0.safetensors", "rank-0.json"]
DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.sampled_from(FILES), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("delete"), st.sampled_from(FILES)),
    st.tuples(st.just("to_dir"), st.sampled_from(FILES)),
    st.tuples(st.just("garbage"), st.sampled_from(FILES), st.binary(max_size=64)),
    st.tuples(st.just("foreign_in_checkpoint"), st.sampled_from(["notes.txt", "model.pt", ".hidden", "sub/x.bin"]),
              st.binary(max_size=32)),
    st.tuples(st.just("foreign_in_folder"), st.sampled_from(["README", "step=9", ".step=4.tmp-abc", "junk"]),
              st.sampled_from(["file", "empty_dir", "dir_with_bad_manifest"])),
)


def apply(dirpath: str, damage: tuple) -> None:
    newest = os.path.join(dirpath, "step=3")
    kind, name = damage[0], damage[1]
    path = os.path.join(newest, name)
    if kind in ("truncate", "flip", "delete", "to_dir", "garbage") and not os.path.isfile(path):
        return  # an earlier damage already removed or replaced it
    if kind == "truncate":
        with open(path, "r+b") as f:
            f.truncate(int(os.path.getsize(path) * damage[2]))
    elif kind == "flip":
        size = os.path.getsize(path)
        if size:
            with open(path, "r+b") as f:
                f.seek(min(int(size * damage[2]), size - 1))
                byte = f.read(1)[0]
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte ^ damage[3]]))
    elif kind == "delete":
        os.remove(path)
    elif kind == "to_dir":
        os.remove(path)
        os.makedirs(path)
    elif kind == "garbage":
        with open(path, "wb") as f:
            f.write(damage[2])
    elif kind == "foreign_in_checkpoint":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(damage[2])
    else:  # something foreign next to the checkpoints
        target = os.path.join(dirpath, name)
        if os.path.exists(target):
            return
        if damage[2] == "file":
            with open(target, "wb") as f:
                f.write(b"not a checkpoint")
        else:
            os.makedirs(target)
            if damage[2] == "dir_with_bad_manifest":
                with open(os.path.join(target, "manifest.json"), "w") as f:
                    f.write('{"format": "kiln-checkpoint", "files": [{"path": "../../etc/passwd"}]}')


def digests(path: str) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(path, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(path))}


class StepAtStart(Callback):
    def on_train_start(self, trainer, module) -> None:
        self.step = trainer.global_step


@fuzz(70)
@given(st.lists(DAMAGE, min_size=1, max_size=3), st.sampled_from(["newest", "last"]))
def test_damaged_checkpoint_folders_load_or_fail_cleanly_and_keep_the_older_one(pristine, parts, damages, how):
    TinyModule, loader = parts
    with tempfile.TemporaryDirectory() as root:
        dirpath = os.path.join(root, "checkpoints")
        shutil.copytree(pristine, dirpath)
        for damage in damages:
            apply(dirpath, damage)
        older = digests(os.path.join(dirpath, "step=2"))
        start = StepAtStart()
        trainer = Trainer(default_root_dir=root, max_epochs=2, logger=False, enable_progress_bar=False,
                          callbacks=[ModelCheckpoint(save_top_k=0), start])
        ckpt_path = os.path.join(dirpath, "step=3") if how == "newest" else "last"
        error = ends_documented(lambda: trainer.fit(TinyModule(), loader(), ckpt_path=ckpt_path))
        if how == "last":  # the older checkpoint is intact, so "last" always finds something to resume
            assert error is None, error
            assert start.step in (2, 3)
        elif error is None:
            assert start.step == 3
        assert digests(os.path.join(dirpath, "step=2")) == older, "an earlier checkpoint was modified"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert os.path.join(dirpath, "step=2") in [m.path for m in list_checkpoints(dirpath)]
