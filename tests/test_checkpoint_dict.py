"""read_checkpoint: a Kiln checkpoint directory as the dict torch.load gives for Lightning's .ckpt file."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import framework
from callbacks import EarlyStopping, ModelCheckpoint
from framework import Trainer, TrainModule
from framework.checkpoint import CheckpointError

# The keys Lightning 2.5 writes for a module with hyperparameters, an optimizer and a scheduler.
LIGHTNING_KEYS = {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
                  "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters"}


class Net(TrainModule):
    def __init__(self, hidden: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, hidden)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["my_note"] = {"epoch_seen": self.current_epoch, "weights": torch.arange(3.0)}


@pytest.fixture
def fitted(tmp_path):
    loader = DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=4)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train_loss", save_top_k=-1, save_last=True)
    stopper = EarlyStopping(monitor="train_loss", patience=5)
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[checkpoints, stopper])
    module = Net(hidden=5)
    trainer.fit(module, loader)
    return trainer, module, checkpoints, stopper


def test_keys_and_values_are_lightnings(fitted):
    trainer, module, checkpoints, stopper = fitted
    ckpt = framework.read_checkpoint(checkpoints.last_model_path)
    assert LIGHTNING_KEYS <= set(ckpt)
    # Lightning's "epoch": the epoch during which it was saved (the last one's end here)
    assert (ckpt["epoch"], ckpt["global_step"]) == (trainer.current_epoch - 1, trainer.global_step) == (1, 6)
    assert ckpt["hyper_parameters"] == {"hidden": 5, "lr": 0.1}
    assert ckpt["state_dict"].keys() == module.state_dict().keys()
    for name, value in module.state_dict().items():
        assert torch.equal(ckpt["state_dict"][name], value)
    saved, live = ckpt["optimizer_states"][0], trainer.optimizers[0].state_dict()
    assert saved["param_groups"][0]["lr"] == live["param_groups"][0]["lr"]
    assert torch.equal(saved["state"][0]["exp_avg"], live["state"][0]["exp_avg"])
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2
    assert ckpt["callbacks"][checkpoints.state_key]["best_model_path"] == checkpoints.best_model_path
    assert ckpt["callbacks"][stopper.state_key]["wait_count"] == stopper.wait_count
    assert torch.equal(ckpt["callbacks"][stopper.state_key]["best_score"], stopper.best_score)
    assert "RNGCapture" in ckpt["callbacks"]  # per-rank callback states: rank 0's, as Lightning's file holds
    assert ckpt["my_note"]["epoch_seen"] == 1 and torch.equal(ckpt["my_note"]["weights"], torch.arange(3.0))


def test_last_and_best_resolve_and_map_location_moves_tensors(fitted):
    _, _, checkpoints, _ = fitted
    dirpath = checkpoints.dirpath
    best = framework.read_checkpoint(f"{dirpath}/best", map_location="meta")
    assert best["global_step"] == framework.read_checkpoint(checkpoints.best_model_path)["global_step"]
    assert all(t.device.type == "meta" for t in best["state_dict"].values())
    assert framework.read_checkpoint(f"{dirpath}/last")["global_step"] == 6


def test_what_is_not_one_checkpoint_is_refused(fitted, tmp_path):
    _, _, checkpoints, _ = fitted
    with pytest.raises(CheckpointError, match="directory of checkpoints"):
        framework.read_checkpoint(checkpoints.dirpath)
    (tmp_path / "file.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"a Kiln checkpoint is a directory.*Lightning .ckpt file.*"
                                              r"torch.load\(path, weights_only=True\)"):
        framework.read_checkpoint(tmp_path / "file.ckpt")
    with pytest.raises(TypeError, match="map_location"):
        framework.read_checkpoint(checkpoints.last_model_path, map_location={"cuda:0": "cpu"})
