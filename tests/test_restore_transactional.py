"""A restore is all-or-nothing: a checkpoint that does not match the run is refused, naming every difference,
before the module, the optimizers or the Trainer change (issue: Reliability II)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def saved(make_trainer, tiny_module_cls, make_loader, tmp_path):
    """A checkpoint of TinyModule trained with SGD (momentum) for one epoch."""

    class Momentum(tiny_module_cls):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    trainer = make_trainer()
    trainer.fit(Momentum(), make_loader(8))
    path = str(tmp_path / "sgd")
    trainer.save_checkpoint(path)
    return path


def test_another_optimizer_class_is_refused_before_anything_changes(make_trainer, tiny_module_cls, make_loader,
                                                                     saved):
    class WithAdam(tiny_module_cls):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.1)

    module = WithAdam()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = make_trainer(max_epochs=3)
    with pytest.raises(ValueError, match=r"(?s)Cannot resume from .*sgd.*nothing was loaded.*optimizer 0 is Adam"
                                         r".*momentum_buffer.*load_from_checkpoint\(path, strict=False\)"):
        trainer.fit(module, make_loader(8), ckpt_path=saved)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert trainer.global_step == 0 and trainer.current_epoch == 0
    assert all(not state for state in trainer.optimizers[0].state.values())


def test_a_module_of_another_shape_is_refused_with_every_difference(make_trainer, tiny_module_cls, make_loader,
                                                                     saved):
    class Wider(tiny_module_cls):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.extra = torch.nn.Linear(1, 1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    module = Wider()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)lacks: extra.bias, extra.weight"):
        make_trainer(max_epochs=3).fit(module, make_loader(8), ckpt_path=saved)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    class Reshaped(tiny_module_cls):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def loss(self, batch):
            return torch.nn.functional.mse_loss(self(batch[0])[:, :1], batch[1])

    with pytest.raises(ValueError, match=r"layer.weight \(1, 4\) != \(2, 4\)"):
        make_trainer(max_epochs=3).fit(Reshaped(), make_loader(8), ckpt_path=saved)


def test_scheduler_and_precision_differences_are_named(make_trainer, tiny_module_cls, make_loader, saved):
    class Scheduled(tiny_module_cls):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    with pytest.raises(ValueError, match=r"(?s)0 LR scheduler\(s\), configure_optimizers\(\) returned 1.*without an fp16 loss scaler"):
        make_trainer(max_epochs=3, precision="16-mixed").fit(Scheduled(), make_loader(8), ckpt_path=saved)


def test_a_matching_checkpoint_still_resumes(make_trainer, tiny_module_cls, make_loader, saved):
    class Momentum(tiny_module_cls):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    trainer = make_trainer(max_epochs=2)
    trainer.fit(Momentum(), make_loader(8), ckpt_path=saved)
    assert trainer.global_step == 4 and trainer.current_epoch == 2


@pytest.mark.parametrize("max_epochs", [2, 3, 4])
def test_a_checkpoint_past_max_epochs_is_refused_as_in_lightning(tmp_path, tiny_module_cls, make_loader, max_epochs):
    from callbacks import ModelCheckpoint
    from framework import Trainer
    from framework.exceptions import MisconfigurationException

    def trainer_for(epochs, **kwargs):
        return Trainer(default_root_dir=str(tmp_path), max_epochs=epochs, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, num_sanity_val_steps=0, **kwargs)

    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer_for(3, callbacks=[every]).fit(tiny_module_cls(), make_loader(8))
    ended_epoch_2 = str(tmp_path / "ckpt" / "epoch=2.ckpt")  # saved as epoch 2 ended: current_epoch 3 on resume
    module = tiny_module_cls()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = trainer_for(max_epochs, enable_checkpointing=False)
    if max_epochs == 2:
        with pytest.raises(MisconfigurationException, match=r"You restored a checkpoint with current_epoch=3, but "
                                                             r"you have set Trainer\(max_epochs=2\).*nothing was loaded"):
            trainer.fit(module, make_loader(8), ckpt_path=ended_epoch_2)
        assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
        assert trainer.global_step == 0
    else:  # at max_epochs nothing is left to train and the run ends at once (as in Lightning); above it, it goes on
        trainer.fit(module, make_loader(8), ckpt_path=ended_epoch_2)
        assert (trainer.global_step, trainer.current_epoch) == ((6, 3) if max_epochs == 3 else (8, 4))
