"""Jobs run on two gloo ranks by tests/test_metrics_distributed.py: epoch values with sync_dist."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from dist_common import trainer
from torch.utils.data import DataLoader, TensorDataset

from framework import TrainModule


class Logs(TrainModule):
    """Validation logs the batch's statistics with and without sync_dist."""

    def __init__(self, group) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.group, self.step_sums = group, []

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        n = len(x)
        self.log("mean", x.mean(), sync_dist=True, batch_size=n)
        self.log("local_mean", x.mean(), batch_size=n)
        self.log("total", x.sum(), sync_dist=True, reduce_fx="sum")
        self.log("largest", x.max(), sync_dist=True, reduce_fx="max")
        self.log("smallest", x.min(), sync_dist=True, reduce_fx=min)
        self.log("step_sum", x.sum(), sync_dist=True, reduce_fx="sum", on_step=True, on_epoch=False)
        self.step_sums.append(float(self.trainer._metrics.step_values["step_sum"]))
        self.log("grouped", x.sum(), sync_dist=True, sync_dist_group=self.group, reduce_fx="sum")
        self.log("zero_only", x.sum(), sync_dist=True, rank_zero_only=True, reduce_fx="sum")


def sync_job() -> None:
    # 7 samples over 2 ranks, never padded: rank 0 gets 0, 2, 4, 6 (batches of 2, 2), rank 1 gets 1, 3, 5 (2, 1)
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    t = trainer()
    t.strategy.setup_environment()  # the process group exists before the module makes a subgroup
    module = Logs(dist.new_group([0, 1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [result] = t.validate(module, DataLoader(TensorDataset(x), batch_size=2))
    unsynced = {str(w.message).split("'")[1] for w in caught if "sync_dist=True to reduce" in str(w.message)}
    assert unsynced == {"local_mean"}, unsynced  # Lightning's hint, for the one epoch value left per rank
    rank = dist.get_rank()
    mine = x[rank::2]
    assert result["mean"] == float(x.mean()), result  # weighted by every batch's size over both ranks
    assert result["local_mean"] == float(mine.mean()), result
    assert (result["total"], result["largest"], result["smallest"]) == (127.0, 64.0, 1.0), result
    assert result["grouped"] == 127.0 and result["zero_only"] == float(mine.sum()), result
    assert module.step_sums == [1 + 4 + 2 + 8, 16 + 64 + 32], module.step_sums  # each step summed over ranks
