"""Lightning's hook order, call for call: module, DataModule and callback hooks across fit/validate/test/predict,
a checkpoint save and a resume.

The expected lists were recorded from PyTorch Lightning 2.5.6 running the same module, DataModule and callback
(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=1, an epoch-interval StepLR).
The one documented difference: on resume Kiln builds the optimizers (``configure_optimizers``) before calling
``on_load_checkpoint``, because a restore is validated as a whole before anything is changed.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks import Callback
from framework import DataModule, Trainer, TrainModule

MODULE_HOOKS = """prepare_data setup teardown configure_callbacks configure_model configure_optimizers on_fit_start
on_fit_end on_train_start on_train_end on_validation_start on_validation_end on_test_start on_test_end on_predict_start
on_predict_end on_train_batch_start on_train_batch_end on_validation_batch_start on_validation_batch_end
on_test_batch_start on_test_batch_end on_predict_batch_start on_predict_batch_end on_validation_model_zero_grad
on_validation_model_eval on_validation_model_train on_test_model_eval on_test_model_train on_predict_model_eval
on_train_epoch_start on_train_epoch_end on_validation_epoch_start on_validation_epoch_end on_test_epoch_start
on_test_epoch_end on_predict_epoch_start on_predict_epoch_end on_before_zero_grad on_before_backward on_after_backward
on_before_optimizer_step optimizer_step optimizer_zero_grad lr_scheduler_step configure_gradient_clipping backward
on_save_checkpoint on_load_checkpoint training_step validation_step test_step predict_step""".split()
CALLBACK_HOOKS = """setup teardown on_fit_start on_fit_end on_sanity_check_start on_sanity_check_end
on_train_batch_start on_train_batch_end on_train_epoch_start on_train_epoch_end on_validation_epoch_start
on_validation_epoch_end on_test_epoch_start on_test_epoch_end on_predict_epoch_start on_predict_epoch_end
on_validation_batch_start on_validation_batch_end on_test_batch_start on_test_batch_end on_predict_batch_start
on_predict_batch_end on_train_start on_train_end on_validation_start on_validation_end on_test_start on_test_end
on_predict_start on_predict_end on_exception on_save_checkpoint on_load_checkpoint on_before_backward
on_after_backward on_before_optimizer_step on_before_zero_grad state_dict load_state_dict""".split()
DATAMODULE_HOOKS = """prepare_data setup teardown train_dataloader val_dataloader test_dataloader predict_dataloader
state_dict load_state_dict on_before_batch_transfer transfer_batch_to_device on_after_batch_transfer""".split()


def _recorded(cls: type, names: list[str], tag: str, calls: list[str]) -> type:
    """A subclass of ``cls`` whose ``names`` append ``tag.name`` to ``calls`` and then do what they did."""

    def wrap(name: str):
        original = getattr(cls, name)

        def hook(self, *args, **kwargs):
            calls.append(f"{tag}.{name}")
            return original(self, *args, **kwargs)

        return hook

    return type(f"Recorded{cls.__name__}", (cls,), {name: wrap(name) for name in names if hasattr(cls, name)})


class _Data(DataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4), torch.randn(4, 1)), batch_size=2)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2)


class _Model(TrainModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def _loss(self, batch):
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self.layer(batch[0])

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1)]


@pytest.fixture
def run(tmp_path):
    calls: list[str] = []
    model_cls = _recorded(_Model, MODULE_HOOKS, "m", calls)
    data_cls = _recorded(_Data, DATAMODULE_HOOKS, "dm", calls)
    callback_cls = _recorded(Callback, CALLBACK_HOOKS, "cb", calls)

    def make(max_epochs: int = 1) -> Trainer:
        return Trainer(callbacks=[callback_cls()], max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1,
                       num_sanity_val_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       enable_checkpointing=False, default_root_dir=str(tmp_path))

    def go(stage: str) -> list[str]:
        calls.clear()
        trainer = make()
        if stage == "fit":
            trainer.fit(model_cls(), datamodule=data_cls())
        else:
            getattr(trainer, stage)(model_cls(), datamodule=data_cls(),
                                    **({"verbose": False} if stage != "predict" else {}))
        return list(calls)

    def save_and_resume() -> tuple[list[str], list[str]]:
        trainer = make()
        trainer.fit(model_cls(), datamodule=data_cls())
        calls.clear()
        trainer.save_checkpoint(str(tmp_path / "ckpt"))
        saved = list(calls)
        calls.clear()
        make(max_epochs=2).fit(model_cls(), datamodule=data_cls(), ckpt_path=str(tmp_path / "ckpt"))
        return saved, list(calls)

    go.save_and_resume = save_and_resume
    return go


def _train_batch(last: bool) -> str:
    return ("dm.on_before_batch_transfer dm.transfer_batch_to_device dm.on_after_batch_transfer cb.on_train_batch_start "
            "m.on_train_batch_start m.optimizer_step m.training_step cb.on_before_zero_grad m.on_before_zero_grad "
            "m.optimizer_zero_grad cb.on_before_backward m.on_before_backward m.backward cb.on_after_backward "
            "m.on_after_backward cb.on_before_optimizer_step m.on_before_optimizer_step m.configure_gradient_clipping "
            + ("m.lr_scheduler_step " if last else "") + "cb.on_train_batch_end m.on_train_batch_end ")


def _eval(name: str, batches: int, model_eval: str) -> str:
    batch = (f"dm.on_before_batch_transfer dm.transfer_batch_to_device dm.on_after_batch_transfer "
             f"cb.on_{name}_batch_start m.on_{name}_batch_start m.{'validation' if name == 'validation' else name}"
             f"_step cb.on_{name}_batch_end m.on_{name}_batch_end ")
    return (f"m.on_{model_eval}_model_eval cb.on_{name}_start m.on_{name}_start cb.on_{name}_epoch_start "
            f"m.on_{name}_epoch_start " + batch * batches + f"cb.on_{name}_epoch_end m.on_{name}_epoch_end "
            f"cb.on_{name}_end m.on_{name}_end ")


SETUP = "m.configure_callbacks dm.prepare_data m.prepare_data dm.setup cb.setup m.setup m.configure_model "
TEARDOWN = "dm.teardown cb.teardown m.teardown"
SANITY = ("cb.on_sanity_check_start dm.val_dataloader " + _eval("validation", 1, "validation")
          + "m.on_validation_model_train cb.on_sanity_check_end ")
TRAIN = ("dm.train_dataloader cb.on_train_start m.on_train_start cb.on_train_epoch_start m.on_train_epoch_start "
         + _train_batch(False) + _train_batch(True) + "m.on_validation_model_zero_grad "
         + _eval("validation", 1, "validation") + "m.on_validation_model_train cb.on_train_epoch_end "
         "m.on_train_epoch_end cb.on_train_end m.on_train_end cb.on_fit_end m.on_fit_end ")
LIGHTNING = {
    "fit": SETUP + "m.configure_optimizers cb.on_fit_start m.on_fit_start " + SANITY + TRAIN + TEARDOWN,
    "validate": SETUP + "dm.val_dataloader " + _eval("validation", 1, "validation") + "m.on_validation_model_train "
                + TEARDOWN,
    "test": SETUP + "dm.test_dataloader dm.val_dataloader " + _eval("test", 2, "test") + "m.on_test_model_train "
            + TEARDOWN,
    "predict": SETUP + "dm.predict_dataloader " + _eval("predict", 2, "predict") + TEARDOWN,
    "save": "cb.state_dict dm.state_dict cb.on_save_checkpoint m.on_save_checkpoint",
    # Lightning: ... m.configure_model m.on_load_checkpoint cb.on_load_checkpoint m.configure_optimizers ...
    "resume": SETUP + "m.configure_optimizers m.on_load_checkpoint cb.on_load_checkpoint cb.on_fit_start "
              "m.on_fit_start " + SANITY + TRAIN + TEARDOWN,
}


@pytest.mark.parametrize("stage", ["fit", "validate", "test", "predict"])
def test_stage_calls_lightnings_hooks_in_lightnings_order(run, stage):
    assert run(stage) == LIGHTNING[stage].split()


def test_save_and_resume_call_lightnings_hooks_in_order(run):
    saved, resumed = run.save_and_resume()
    assert saved == LIGHTNING["save"].split()
    assert resumed == LIGHTNING["resume"].split()
