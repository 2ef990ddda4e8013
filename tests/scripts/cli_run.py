"""A LightningCLI script for tests/test_cli.py: after each stage it writes what the CLI built to report.json."""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from framework import DataModule, TrainModule
from framework.cli import LightningCLI


class Regressor(TrainModule):
    def __init__(self, hidden: int = 8, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.loaded_config = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_load_checkpoint(self, checkpoint):
        self.loaded_config = checkpoint.get("cli_config")


class Points(DataModule):
    def __init__(self, batch_size: int = 4, size: int = 16) -> None:
        super().__init__()
        self.batch_size, self.size = batch_size, size

    def setup(self, stage):
        x = torch.randn(self.size, 4, generator=torch.Generator().manual_seed(0))
        self.points = TensorDataset(x, x.sum(1, keepdim=True))

    def train_dataloader(self):
        return DataLoader(self.points, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.points, batch_size=self.batch_size)


class ReportingCLI(LightningCLI):
    def after_fit(self):
        trainer, model = self.trainer, self.model
        optimizer = trainer.optimizers[0]
        report = {
            "hidden": model.net[0].out_features, "lr": model.lr, "batch_size": self.datamodule.batch_size,
            "global_step": trainer.global_step, "max_epochs": trainer.max_epochs,
            "optimizer": type(optimizer).__name__, "optimizer_lr": optimizer.defaults["lr"],
            "schedulers": [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs],
            "callbacks": [type(c).__name__ for c in trainer.callbacks], "log_dir": trainer.log_dir,
            "loaded_config": model.loaded_config,
        }
        with open(os.environ["CLI_REPORT"], "w", encoding="utf-8") as f:
            json.dump(report, f)


if __name__ == "__main__":
    ReportingCLI(Regressor, Points, args=sys.argv[1:])
