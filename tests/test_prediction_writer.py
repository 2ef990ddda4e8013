"""BasePredictionWriter: batch, epoch and batch_and_epoch intervals writing real files during predict."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TinyModule

from callbacks.prediction_writer import BasePredictionWriter


class FileWriter(BasePredictionWriter):
    def __init__(self, out_dir, write_interval):
        super().__init__(write_interval)
        self.out_dir = out_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        torch.save(prediction, os.path.join(self.out_dir, f"batch_{dataloader_idx}_{batch_idx}.pt"))

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        torch.save(predictions, os.path.join(self.out_dir, "epoch.pt"))
        self.epoch_batch_indices = batch_indices


@pytest.mark.parametrize(("interval", "batch_files", "epoch_file"), [
    ("batch", 3, False), ("epoch", 0, True), ("batch_and_epoch", 3, True)])
def test_intervals_write_files(make_trainer, make_loader, tmp_path, interval, batch_files, epoch_file):
    out = tmp_path / "preds"
    out.mkdir()
    writer = FileWriter(str(out), interval)
    module = TinyModule()
    returned = make_trainer(callbacks=[writer]).predict(module, make_loader(num_samples=12))
    files = sorted(os.listdir(out))
    assert len([f for f in files if f.startswith("batch_")]) == batch_files
    assert ("epoch.pt" in files) is epoch_file
    if batch_files:
        torch.testing.assert_close(torch.load(out / "batch_0_1.pt"), returned[1])
    if epoch_file:
        saved = torch.load(out / "epoch.pt")
        assert len(saved) == 3
        for got, expected in zip(saved, returned):
            torch.testing.assert_close(got, expected)
        assert len(writer.epoch_batch_indices) == 1 and len(writer.epoch_batch_indices[0]) == 3


def test_missing_write_method_and_bad_interval(make_trainer, make_loader):
    with pytest.raises(ValueError, match="write_interval"):
        BasePredictionWriter("step")
    with pytest.raises(NotImplementedError, match="write_on_batch_end"):
        make_trainer(callbacks=[BasePredictionWriter()]).predict(TinyModule(), make_loader())


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_indices_are_the_dataset_indices_of_each_batch(make_trainer, make_loader, workers):
    seen = []

    class Indices(BasePredictionWriter):
        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
            seen.append(batch_indices)

        def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
            self.epoch_indices = batch_indices

    writer = Indices("batch_and_epoch")
    loader = make_loader(num_samples=10, batch_size=4, shuffle=True, num_workers=workers)
    module = TinyModule()
    outputs = make_trainer(callbacks=[writer]).predict(module, loader)
    assert sorted(i for batch in seen for i in batch) == list(range(10)) and [len(b) for b in seen] == [4, 4, 2]
    assert writer.epoch_indices == [seen]
    data = loader.dataset.tensors[0]
    with torch.no_grad():
        for batch, output in zip(seen, outputs):  # each output was computed from the samples its indices name
            torch.testing.assert_close(output, module(data[batch]))
