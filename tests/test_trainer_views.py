"""trainer.state and the stage flags (training, validating, sanity_checking, evaluating...) as Lightning reports
them. The expected rows were recorded from Lightning 2.5.6 running the same module and callback."""

from __future__ import annotations

import pytest

from framework import Callback, Trainer


def row(trainer, where):
    s = trainer.state
    return (where, s.fn, s.stage, s.status, s.finished, s.stopped, trainer.training, trainer.validating,
            trainer.sanity_checking, trainer.evaluating, trainer.testing, trainer.predicting)


class Record(Callback):
    def __init__(self, rows):
        self.rows = rows

    def on_sanity_check_start(self, trainer, module):
        self.rows.append(row(trainer, "sanity"))

    def on_train_start(self, trainer, module):
        self.rows.append(row(trainer, "train"))

    def on_validation_start(self, trainer, module):
        self.rows.append(row(trainer, "validation"))

    def on_test_start(self, trainer, module):
        self.rows.append(row(trainer, "test"))

    def on_predict_start(self, trainer, module):
        self.rows.append(row(trainer, "predict"))


R, F, INTERRUPTED = "running", "finished", "interrupted"


def test_state_and_stage_flags_follow_lightnings(tmp_path, tiny_module_cls, make_loader):
    rows = []
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=1, num_sanity_val_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[Record(rows)])
    rows.append(row(trainer, "init"))
    module = tiny_module_cls()
    trainer.fit(module, make_loader(8), make_loader(4))
    rows.append(row(trainer, "after fit"))
    trainer.validate(module, make_loader(4), verbose=False)
    trainer.test(module, make_loader(4), verbose=False)
    trainer.predict(module, make_loader(4))
    rows.append(row(trainer, "after predict"))
    # where, fn, stage, status, finished, stopped, training, validating, sanity_checking, evaluating, testing, predicting
    assert rows == [
        ("init", None, None, "initializing", False, False, False, False, False, False, False, False),
        ("sanity", "fit", "sanity_check", R, False, False, False, False, True, True, False, False),
        ("validation", "fit", "sanity_check", R, False, False, False, False, True, True, False, False),
        ("train", "fit", "train", R, False, False, True, False, False, False, False, False),
        ("validation", "fit", "validate", R, False, False, False, True, False, True, False, False),
        ("after fit", "fit", None, F, True, True, False, False, False, False, False, False),
        ("validation", "validate", "validate", R, False, False, False, True, False, True, False, False),
        ("test", "test", "test", R, False, False, False, False, False, True, True, False),
        ("predict", "predict", "predict", R, False, False, False, False, False, False, False, True),
        ("after predict", "predict", None, F, True, True, False, False, False, False, False, False),
    ]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_leaves_the_state_interrupted(make_trainer, tiny_module_cls, make_loader, error):
    class Fails(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            raise error

    trainer = make_trainer()
    with pytest.raises(type(error)):
        trainer.fit(Fails(), make_loader(8))
    state = trainer.state
    assert (state.fn, state.stage, state.status, state.finished, state.stopped) == ("fit", None, INTERRUPTED, False, True)
    assert trainer.interrupted and not trainer.training
    trainer.fit(tiny_module_cls(), make_loader(8))
    assert trainer.state.finished and not trainer.interrupted
