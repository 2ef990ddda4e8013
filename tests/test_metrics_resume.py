"""Resuming mid-epoch from a checkpoint continues the running metric accumulators bit-exactly: the epoch
values after the resume equal the uninterrupted run's, in a Trainer that shares nothing with the first."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks import Callback
from framework import Trainer, TrainModule

torchmetrics = pytest.importorskip("torchmetrics")


class Logs(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("loss", loss, on_epoch=True)  # weighted by the inferred batch size (the last batch is short)
        self.log("y_sum", y.sum(), on_step=False, on_epoch=True, reduce_fx="sum")
        self.log("x_max", x.max(), on_step=False, on_epoch=True, reduce_fx="max")
        self.log("given", loss * 3, on_step=False, on_epoch=True, batch_size=batch_idx + 1)
        self.seen(y)
        self.log("seen", self.seen, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(27, 3, generator=g) * 100, torch.randn(27, 1, generator=g)),
                      batch_size=4)  # 7 batches: 6 of 4 and one of 3


class SaveAt(Callback):
    def __init__(self, path: str, batch: int) -> None:
        self.path, self.batch = path, batch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.batch and trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def epoch_values(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in trainer.callback_metrics.items() if k != "loss_step"}


@pytest.mark.parametrize("batch", [0, 3])
def test_resume_mid_epoch_continues_the_running_metrics_bit_exactly(tmp_path, batch):
    kwargs = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    path = str(tmp_path / "mid")
    straight = Trainer(callbacks=[SaveAt(path, batch)], **kwargs)
    torch.manual_seed(1)
    straight.fit(Logs(), loader())
    expected = epoch_values(straight)
    assert {"loss", "loss_epoch", "y_sum", "x_max", "given", "seen"} <= set(expected)

    resumed = Trainer(**kwargs)
    torch.manual_seed(2)  # different initial weights: the checkpoint must bring everything back
    resumed.fit(Logs(), loader(), ckpt_path=path)
    got = epoch_values(resumed)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), (key, got[key], value)
