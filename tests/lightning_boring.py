"""The BoringModule variant the ModelCheckpoint/EarlyStopping behaviour tests count on (shared by both files)."""

from __future__ import annotations

from typing import Any

import torch

from framework.testing import BoringModule


class Boring(BoringModule):
    """BoringModule pinned to what these tests count on: 32 batches of 2 per epoch, train_loss/val_loss logged."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"batch_size": 2, "length": 64, **kwargs})

    def _loss(self, batch: Any) -> torch.Tensor:
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch).pow(2).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))
