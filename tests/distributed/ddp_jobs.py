"""Jobs run on two gloo ranks by tests/test_ddp.py (through framework.testing.run_distributed)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from dist_common import (
    ManualRegression,
    Regression,
    SummedRegression,
    assert_close,
    chunks,
    dataset,
    loader,
    reference_sgd,
    trainer,
)

from framework import DistributedState


def _topology_and_collectives(strategy) -> None:
    rank = dist.get_rank()
    state = DistributedState()
    assert (state.num_processes, state.process_index, state.local_process_index) == (2, rank, rank)
    assert state.backend == "gloo" and state.device == torch.device("cpu") and state.initialized
    assert state.is_main_process == (rank == 0) and state.is_local_main_process == (rank == 0)
    value = torch.tensor(float(rank + 1))
    assert strategy.all_reduce(value, "sum").item() == 3.0 and strategy.all_reduce(value, "mean").item() == 1.5
    assert strategy.all_reduce(value, "max").item() == 2.0 and strategy.all_reduce(value, "min").item() == 1.0
    assert value.item() == rank + 1  # not reduced in place
    assert strategy.all_gather(value).tolist() == [1.0, 2.0]
    assert strategy.broadcast({"rank": rank}) == {"rank": 0}
    assert strategy.all_gather_object(rank) == [0, 1]
    assert strategy.reduce_boolean_decision(rank == 0) is False
    assert strategy.reduce_boolean_decision(rank == 0, all=False) is True
    strategy.barrier()


def _count_allreduces(ddp_model) -> list[int]:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = [0]

    def hook(state, bucket):
        calls[0] += 1
        return allreduce_hook(state, bucket)

    ddp_model.register_comm_hook(None, hook)
    return calls


def equivalence_job(root: str) -> None:
    """Two ranks x batch B == one process x batch 2B; accumulation syncs once per window; topology;
    a checkpoint saved after fit (the process group outlives fit) loads into a fresh module."""
    data = dataset(16)
    module = Regression()
    t = trainer(strategy="ddp", max_epochs=2)
    t.fit(module, loader(16, 2))
    _topology_and_collectives(t.strategy)
    expected = reference_sgd(Regression(), [[ids] for ids in chunks(list(range(16)), 4)] * 2, data=data)
    assert_close(module.state_dict(), expected)
    assert t.global_step == 8

    manual = ManualRegression()  # backward inside the step: gradients are averaged by the strategy
    trainer(strategy="ddp", max_epochs=2).fit(manual, loader(16, 2))
    assert_close(manual.state_dict(), expected)

    path = os.path.join(root, "after-fit")
    t.save_checkpoint(path)
    fresh = Regression(seed=1)
    trainer(strategy="ddp").validate(fresh, loader(4, 2), ckpt_path=path)
    assert_close(fresh.state_dict(), module.state_dict(), tol=0)

    # accumulation: B=1 per rank, 2 micro-batches per window == batches of 4 in one process
    module = Regression()
    t = trainer(strategy="ddp", accumulate_grad_batches=2, gradient_clip_val=0.5)
    calls = []
    module.on_fit_start = lambda: calls.append(_count_allreduces(t.strategy.model))
    t.fit(module, loader(16, 1))
    expected = reference_sgd(Regression(), [[ids] for ids in chunks(list(range(16)), 4)], data=data, clip=0.5)
    assert_close(module.state_dict(), expected)
    assert t.global_step == 4 and calls[0][0] == 4, (t.global_step, calls[0][0])  # one all-reduce per window

    # static_graph: torch asserts when DDP's first iteration runs under no_sync, so Kiln synchronises the
    # micro-batches until one backward has (the same mean); from then on one all-reduce per window
    from strategies import DDPStrategy

    module = Regression()
    t = trainer(strategy=DDPStrategy(static_graph=True), accumulate_grad_batches=2, gradient_clip_val=0.5)
    t.fit(module, loader(16, 1))
    assert_close(module.state_dict(), expected)


def uneven_job() -> None:
    """even_batches True/False over 9 samples; exact validation metric and predictions without padding."""
    rank = int(os.environ["RANK"])
    data = dataset(9)

    module = Regression()
    t = trainer(strategy="ddp", even_batches=True)
    t.fit(module, loader(9, 2))
    assert [len(ids) for ids, _ in module.seen] == [2, 2, 1] and not any(g for _, g in module.seen)
    assert t.global_step == 3

    module = Regression()
    t = trainer(strategy="ddp", even_batches=False, max_epochs=2)
    t.fit(module, loader(9, 2), val_dataloaders=loader(9, 2))
    real = [ids for ids, ghost in module.seen if not ghost]
    ghosts = [ids for ids, ghost in module.seen if ghost]
    assert len(real) == (6 if rank == 0 else 4) and len(ghosts) == (0 if rank == 0 else 2), module.seen
    per_epoch = [sorted(sum(real[e * len(real) // 2:(e + 1) * len(real) // 2], [])) for e in range(2)]
    gathered = t.strategy.all_gather_object(per_epoch)
    for epoch in range(2):
        assert sorted(gathered[0][epoch] + gathered[1][epoch]) == list(range(9))  # each sample once per epoch
    assert t.global_step == 6 and t.strategy.all_gather_object(t.global_step) == [6, 6]
    # rank 0 holds ids 0,2,4,6,8 and rank 1 holds 1,3,5,7: steps average the ranks that have data
    steps = [[[0, 2], [1, 3]], [[4, 6], [5, 7]], [[8]]] * 2
    assert_close(module.state_dict(), reference_sgd(Regression(), steps, data=data))

    # num_items: ghost batches count zero items, so each step is the exact mean over its real items
    module = SummedRegression()
    trainer(strategy="ddp", even_batches=False, max_epochs=2).fit(module, loader(9, 2))
    assert_close(module.state_dict(), reference_sgd(Regression(), steps, data=data))

    x, y, _ = data[:]
    exact = torch.nn.functional.mse_loss(module(x), y).item()
    (metrics,) = t.validate(module, loader(9, 2))
    assert abs(metrics["val_loss"] - exact) < 1e-5, (metrics, exact)
    with pytest.warns(UserWarning, match="fewer samples than processes"):
        (tiny,) = t.validate(module, loader(1, 2))  # rank 1 would have no batch: padded, no hang
    x1, y1, _ = dataset(1)[:]
    assert abs(tiny["val_loss"] - torch.nn.functional.mse_loss(module(x1), y1).item()) < 1e-5
    predicted = t.predict(module, loader(9, 2))
    mine = sum((ids.tolist() for ids in predicted), [])
    assert sorted(sum(t.strategy.all_gather_object(mine), [])) == list(range(9))  # every sample exactly once


def toggle_model_job() -> None:
    """Manual accumulation under DDP with Lightning's ``optimizer.toggle_model(sync_grad=...)``: gradients stay
    rank-local inside ``sync_grad=False``, are averaged by the backward with ``sync_grad=True``, and the result
    equals one process stepping on batches of 4."""

    class Accumulating(ManualRegression):
        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            x, y, _ = batch
            last = batch_idx % 2 == 1
            with optimizer.toggle_model(sync_grad=last):
                self.manual_backward(torch.nn.functional.mse_loss(self(x), y) / 2)
                grads = torch.cat([p.grad.reshape(-1) for p in self.parameters()])
                gathered = [torch.empty_like(grads) for _ in range(2)]
                dist.all_gather(gathered, grads)
                assert torch.equal(gathered[0], gathered[1]) == last, (batch_idx, last)
            if last:
                optimizer.step()
                optimizer.zero_grad()

    module = Accumulating()
    trainer(strategy="ddp").fit(module, loader(16, 1))
    data = dataset(16)
    expected = reference_sgd(Regression(), [[ids] for ids in chunks(list(range(16)), 4)], data=data)
    assert_close(module.state_dict(), expected)
