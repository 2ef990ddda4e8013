"""Hook order and counts: every callback and module hook recorded during fit/validate/test/predict."""

from __future__ import annotations

import pytest
import torch

from framework.hooks import HOOK_NAMES, Callback, CallbackList

MODULE_HOOKS = ["on_fit_start", "on_fit_end", "on_train_epoch_start", "on_train_epoch_end",
                "on_validation_epoch_start", "on_validation_epoch_end", "on_test_epoch_start", "on_test_epoch_end",
                "on_before_backward", "on_after_backward", "on_before_optimizer_step"]


def recording_callback(log: list, tag: str = "cb") -> Callback:
    """A Callback overriding every hook; appends ``(tag, hook)`` (and the stage / batch_idx argument) to ``log``."""

    def make(name):
        def hook(self, trainer, module, *args):
            if name in ("setup", "teardown"):
                log.append((tag, name, args[0]))
            elif name.endswith("_batch_start") or name.endswith("_batch_end"):
                log.append((tag, name, args[-1]))
            else:
                log.append((tag, name))

        return hook

    return type("Recorder", (Callback,), {name: make(name) for name in HOOK_NAMES})()


@pytest.fixture
def recording_module(tiny_module_cls):
    """``make(log)``: a TinyModule whose contract hooks and step methods append ``("module", name)``."""

    def make(log: list):
        def make_hook(name):
            def hook(self, *args):
                log.append(("module", name))

            return hook

        def step(name):
            def run(self, batch, batch_idx, *rest):
                log.append(("module", name, batch_idx))
                return getattr(tiny_module_cls, name)(self, batch, batch_idx)

            return run

        body = {name: make_hook(name) for name in MODULE_HOOKS}
        body.update({name: step(name) for name in ("training_step", "validation_step", "test_step")})
        return type("Recorded", (tiny_module_cls,), body)()

    return make


def _validation(batches: int) -> list:
    events = [("cb", "on_validation_start"), ("cb", "on_validation_epoch_start"),
              ("module", "on_validation_epoch_start")]
    for i in range(batches):
        events += [("cb", "on_validation_batch_start", i), ("module", "validation_step", i),
                   ("cb", "on_validation_batch_end", i)]
    events += [("cb", "on_validation_epoch_end"), ("module", "on_validation_epoch_end"), ("cb", "on_validation_end")]
    return events


def _train_batch(i: int, steps: bool = True, zero_grad: bool = True) -> list:
    events = [("cb", "on_train_batch_start", i), ("module", "training_step", i)]
    if zero_grad:
        events += [("cb", "on_before_zero_grad")]
    events += [("cb", "on_before_backward"), ("module", "on_before_backward"),
              ("cb", "on_after_backward"), ("module", "on_after_backward")]
    if steps:
        events += [("cb", "on_before_optimizer_step"), ("module", "on_before_optimizer_step")]
    return events + [("cb", "on_train_batch_end", i)]


def test_fit_hook_order_and_counts(make_trainer, recording_module, make_loader):
    """2 epochs x 5 batches, validation (3 batches) at every epoch end."""
    log: list = []
    trainer = make_trainer(max_epochs=2, callbacks=[recording_callback(log)])
    trainer.fit(recording_module(log), make_loader(20, batch_size=4), make_loader(12, batch_size=4))

    expected = [("cb", "setup", "fit"), ("cb", "on_fit_start"), ("module", "on_fit_start"), ("cb", "on_train_start")]
    for _ in range(2):
        expected += [("cb", "on_train_epoch_start"), ("module", "on_train_epoch_start")]
        for i in range(5):
            expected += _train_batch(i)
        expected += _validation(3)
        expected += [("cb", "on_train_epoch_end"), ("module", "on_train_epoch_end")]
    expected += [("cb", "on_train_end"), ("cb", "on_fit_end"), ("module", "on_fit_end"), ("cb", "teardown", "fit")]
    assert log == expected
    assert trainer.global_step == 10 and trainer.current_epoch == 2


def test_accumulation_steps_once_per_window(make_trainer, recording_module, make_loader):
    log: list = []
    trainer = make_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[recording_callback(log)])
    trainer.fit(recording_module(log), make_loader(20, batch_size=4))
    per_batch = {"on_train_batch_start", "training_step", "on_before_backward", "on_after_backward",
                 "on_before_optimizer_step", "on_train_batch_end"}
    train = [e for e in log if e[1] in per_batch]
    # 5 batches in windows [0,1] [2,3] [4]: the tail window steps too.
    # Gradients are cleared as each window opens (Lightning's point), so on_before_zero_grad precedes its first backward.
    assert train == [e for i in range(5) for e in _train_batch(i, steps=i in (1, 3, 4), zero_grad=False)]
    zero_grads = [i for i, e in enumerate(log) if e[1] == "on_before_zero_grad"]
    starts = [log.index(("cb", "on_train_batch_start", i)) for i in (0, 2, 4)]
    assert len(zero_grads) == 3 and all(s < z for s, z in zip(starts, zero_grads))
    assert trainer.global_step == 3


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluation_hook_order(make_trainer, recording_module, make_loader, stage):
    log: list = []
    trainer = make_trainer(callbacks=[recording_callback(log)])
    results = getattr(trainer, stage)(recording_module(log), make_loader(8, batch_size=4))
    name = "validation" if stage == "validate" else "test"
    expected = [("cb", "setup", stage), *_validation(2), ("cb", "teardown", stage)]
    expected = [(e[0], e[1].replace("validation", name), *e[2:]) for e in expected]
    assert log == expected
    assert len(results) == 1


def test_predict_hook_order(make_trainer, tiny_module_cls, make_loader):
    log: list = []
    trainer = make_trainer(callbacks=[recording_callback(log)])
    outputs = trainer.predict(tiny_module_cls(), make_loader(12, batch_size=4))
    expected = [("cb", "setup", "predict"), ("cb", "on_predict_start"), ("cb", "on_predict_epoch_start")]
    for i in range(3):
        expected += [("cb", "on_predict_batch_start", i), ("cb", "on_predict_batch_end", i)]
    expected += [("cb", "on_predict_epoch_end"), ("cb", "on_predict_end"), ("cb", "teardown", "predict")]
    assert log == expected and len(outputs) == 3


def test_callbacks_run_in_list_order(make_trainer, tiny_module_cls, make_loader):
    log: list = []
    trainer = make_trainer(max_epochs=1, callbacks=[recording_callback(log, "a"), recording_callback(log, "b")])
    trainer.fit(tiny_module_cls(), make_loader(8, batch_size=4), make_loader(4, batch_size=4))
    assert len(log) > 20
    for first, second in zip(log[::2], log[1::2]):
        assert (first[0], second[0]) == ("a", "b") and first[1:] == second[1:]


def test_checkpoint_callbacks_run_last_and_save_what_the_others_updated(tmp_path, tiny_module_cls, make_loader):
    """Lightning's order: ModelCheckpoint callbacks move behind every other callback (their own order kept), so a
    checkpoint saved at an epoch's end holds EarlyStopping's state after that epoch's check."""
    from callbacks import EarlyStopping, ModelCheckpoint
    from framework import Trainer
    from framework.checkpoint import read_state

    first, second = ModelCheckpoint(dirpath=tmp_path / "a"), ModelCheckpoint(dirpath=tmp_path / "b")
    stopper = EarlyStopping(monitor="watched", patience=9)

    class Logs(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("watched", loss, on_epoch=True)
            return loss

    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[first, stopper, second])
    assert trainer.callbacks.index(stopper) < trainer.callbacks.index(first) < trainer.callbacks.index(second)
    assert trainer.callbacks[-2:] == [first, second]
    trainer.fit(Logs(), make_loader(8))
    saved = read_state(first.last_model_path or first.best_model_path, "trainer")["callbacks"][stopper.state_key]
    assert torch.equal(saved["best_score"], stopper.best_score) and saved["wait_count"] == stopper.wait_count


def test_exception_reaches_on_exception_and_skips_teardown(make_trainer, tiny_module_cls, make_loader):
    log: list = []

    class Boom(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise KeyError("boom")
            return super().training_step(batch, batch_idx)

    seen = []

    class Catch(Callback):
        def on_exception(self, trainer, module, exception):
            seen.append(exception)

    trainer = make_trainer(callbacks=[recording_callback(log), Catch()])
    with pytest.raises(KeyError, match="boom"):
        trainer.fit(Boom(), make_loader())
    assert isinstance(seen[0], KeyError)
    assert log[-1] == ("cb", "on_exception") and ("cb", "teardown", "fit") not in log
    assert [e[2] for e in log if e[1] == "on_train_batch_end"] == [0, 1]


# ---- dispatch -----------------------------------------------------------------------------------------
class OnlyBatchEnd(Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        pass


class Inherits(OnlyBatchEnd):
    pass


def test_only_overridden_hooks_are_dispatched():
    hooks = CallbackList([OnlyBatchEnd(), Inherits(), Callback()])
    assert len(hooks.on_train_batch_end.hooks) == 2  # an inherited override counts
    assert not hooks.on_train_batch_start and not hooks.on_before_backward
    assert hooks.on_train_batch_end and len(hooks) == 3


def test_every_contract_hook_exists_on_callback():
    contract = {"setup", "teardown", "on_fit_start", "on_fit_end", "on_train_epoch_start", "on_train_epoch_end",
                "on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                "on_before_optimizer_step", "on_validation_start", "on_validation_end", "on_validation_epoch_start",
                "on_validation_epoch_end", "on_validation_batch_end", "on_save_checkpoint", "on_load_checkpoint",
                "on_exception"}
    contract |= {f"on_{stage}_{when}" for stage in ("test", "predict") for when in
                 ("start", "end", "epoch_start", "epoch_end", "batch_start", "batch_end")}
    assert contract <= set(HOOK_NAMES)


def test_callback_state_defaults():
    assert OnlyBatchEnd().state_key == "OnlyBatchEnd"
    assert OnlyBatchEnd().state_dict() == {}


def test_module_hooks_see_the_loss_and_optimizer(make_trainer, tiny_module_cls, make_loader):
    seen = {}

    class M(tiny_module_cls):
        def on_before_backward(self, loss):
            seen.setdefault("loss", loss)

        def on_after_backward(self):
            seen.setdefault("grad", self.layer.weight.grad.clone())

        def on_before_optimizer_step(self, optimizer):
            seen.setdefault("optimizer", optimizer)

    trainer = make_trainer(max_steps=1)
    trainer.fit(M(), make_loader())
    assert seen["loss"].requires_grad and seen["loss"].ndim == 0
    assert seen["grad"].abs().sum() > 0
    assert seen["optimizer"] is trainer.optimizers[0] and isinstance(seen["optimizer"], torch.optim.SGD)
