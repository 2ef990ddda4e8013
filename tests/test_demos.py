"""framework.demos.boring_classes behaves like Lightning's: the step counts and checkpoint names that Lightning's
own tests assert on come out the same after an import rename."""

from __future__ import annotations

import torch

from framework import Callback, Trainer, seed_everything
from framework.demos.boring_classes import (
    BoringDataModule,
    BoringModel,
    DemoModel,
    ManualOptimBoringModel,
    RandomDictDataset,
    RandomIterableDatasetWithLen,
)


def _trainer(tmp_path, **kwargs):
    return Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, logger=False, **kwargs)


def test_boring_model_trains_64_steps_an_epoch_with_lightnings_checkpoint_name(tmp_path):
    seed_everything(1)
    trainer = _trainer(tmp_path, max_epochs=2, limit_val_batches=2)
    trainer.fit(BoringModel())
    assert trainer.global_step == 128
    assert trainer.checkpoint_callback.best_model_path.endswith("epoch=1-step=128.ckpt")
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [0.1 * 0.1 ** 2]


def test_manual_and_datamodule_variants(tmp_path):
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(ManualOptimBoringModel(), datamodule=BoringDataModule())
    assert trainer.global_step == 64
    assert len(trainer.predict(BoringModel(), datamodule=BoringDataModule())) == 64
    demo = _trainer(tmp_path, max_steps=3, enable_checkpointing=False)
    demo.fit(DemoModel(), BoringModel().train_dataloader())
    assert demo.global_step == 3


def test_datasets():
    item = RandomDictDataset(4, 3)[1]
    assert torch.equal(item["b"], item["a"] + 2)
    assert len(RandomIterableDatasetWithLen(4, 5)) == 5 and len(list(RandomIterableDatasetWithLen(4, 5))) == 5
    assert issubclass(Callback, object) and Callback.__module__ == "framework.hooks"
