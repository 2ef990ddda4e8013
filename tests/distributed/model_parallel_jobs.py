"""The 4-rank gloo job of tests/test_model_parallel.py: a 2 x 2 (data_parallel x tensor_parallel) mesh.

One job covers several checks so that the suite starts four processes once: equivalence with a
one-process run on the global batch (SGD with clipping, AdamW), data sharding over data_parallel only,
metric reduction, a 2 x 2 checkpoint resumed bit-exactly on 2 x 2 and loaded on 4 x 1, compiled runs
(2 x 2, and DDP with accumulation windows), the refusal of TP without configure_model, and the
README's Parallelism example.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from dist_common import assert_close, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import Callback
from framework import TrainModule
from strategies import ModelParallelStrategy

DIM, HIDDEN = 8, 16


class Block(nn.Module):
    """A pre-norm MLP block: w1 is split by columns and w2 by rows under tensor parallelism."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.w1 = nn.Linear(DIM, HIDDEN)
        self.w2 = nn.Linear(HIDDEN, DIM)
        self.calls = 0  # forward runs: twice per step under activation checkpointing (the recomputation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.w2(torch.tanh(self.w1(self.norm(x))))


class TPModel(TrainModule):
    """Two blocks and a head. ``configure_model`` applies TP (and, with ``user_shard``, FSDP) itself."""

    def __init__(self, optimizer: str = "sgd", user_shard: bool = False, tp: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, 1)
        self.optimizer, self.user_shard, self.tp = optimizer, user_shard, tp
        self.seen: list[list[int]] = []

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = self.device_mesh
        if mesh is None:
            return
        for block in self.blocks:
            if self.tp:
                parallelize_module(block, mesh["tensor_parallel"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
            if self.user_shard:
                fully_shard(block, mesh=mesh["data_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, ids = batch
        self.seen.append(ids.tolist())
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        mesh = self.device_mesh
        if mesh is not None and mesh.mesh_dim_names == ("data_parallel", "tensor_parallel"):  # samples seen, once each
            self.log("samples", float(len(x)), reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True,
                     sync_dist_group=mesh["data_parallel"].get_group())
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dataset(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, DIM, generator=g), torch.randn(n, 1, generator=g), torch.arange(n))


def loader(batch_size: int = 2, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset(), batch_size=batch_size, shuffle=shuffle)


def reference(optimizer: str, global_batches: list[list[int]], clip: float | None = None) -> dict[str, torch.Tensor]:
    """One process, plain PyTorch, each step on the union of the data-parallel ranks' batches."""
    module = TPModel(optimizer)
    opt = module.configure_optimizers()
    data = dataset()
    for ids in global_batches:
        x, y, _ = data[ids]
        opt.zero_grad()
        nn.functional.mse_loss(module(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def mesh(dp: int = 2, tp: int = 2, **kwargs: Any) -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp, **kwargs)


def global_batches(t: Any, module: TPModel) -> list[list[int]]:
    """The per-step union over data-parallel ranks; checks that a tensor-parallel group shares batches."""
    seen = t.strategy.all_gather_object(module.seen)  # by global rank: (dp0,tp0), (dp0,tp1), (dp1,tp0), (dp1,tp1)
    assert seen[0] == seen[1] and seen[2] == seen[3], seen
    assert not set(sum(seen[0], [])) & set(sum(seen[2], [])), seen  # data_parallel ranks see different samples
    return [a + b for a, b in zip(seen[0], seen[2])]


def equivalence(root: str) -> None:
    """SGD (clipped, activation checkpointing, Kiln's default FSDP) and AdamW (user's fully_shard) on 2 x 2
    == one process; bf16-mixed through FSDP2's MixedPrecisionPolicy."""
    from torch.distributed.tensor import DTensor

    module = TPModel("sgd")
    t = trainer(strategy=mesh(activation_checkpointing_policy={Block}), devices=4, max_steps=6, gradient_clip_val=0.05)
    t.fit(module, loader())
    assert [b.calls for b in module.blocks] == [12, 12]  # 6 forwards + 6 recomputations in backward
    w1 = module.blocks[0].w1.weight
    assert isinstance(w1, DTensor) and w1.device_mesh.mesh_dim_names == ("data_parallel", "tensor_parallel")
    assert module.blocks[0].w1.weight.to_local().numel() == HIDDEN * DIM // 4  # 1/4 of the weight per rank
    assert float(t.grad_norm) > 0.05  # clipping acted, on a norm over both meshes
    assert_close(t.strategy.module_state_dict(), reference("sgd", global_batches(t, module), clip=0.05))
    # reduced over data_parallel, sums count each batch once, not tensor_parallel_size times
    assert float(t.callback_metrics["samples"]) == 6 * 2 * 2, t.callback_metrics  # steps x batch x data_parallel
    one = torch.tensor(1.0)
    assert float(t.strategy.reduce_metric(one, "sum")) == 2 and float(t.strategy.all_reduce(one, "sum")) == 4

    module = TPModel("adamw", user_shard=True)
    t = trainer(strategy=mesh(), devices=4, max_steps=6)
    t.fit(module, loader())
    assert_close(t.strategy.module_state_dict(), reference("adamw", global_batches(t, module)))

    module = TPModel("adamw")
    t = trainer(strategy=mesh(), devices=4, max_steps=1, precision="bf16-mixed")
    policy = t.strategy.mixed_precision_policy()
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    t.fit(module, loader())
    assert all(p.dtype == torch.float32 for p in module.parameters())  # sharded masters stay fp32


class SaveAt(Callback):
    def __init__(self, path: str, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not os.path.exists(self.path):
            trainer.save_checkpoint(self.path)
            self.model = {k: v.clone() for k, v in trainer.strategy.module_state_dict().items()}
            state = trainer.strategy.optimizer_state_dict(trainer.optimizers[0])["state"]
            self.optim = {n: {k: torch.as_tensor(v).clone() for k, v in s.items()} for n, s in state.items()}


def _state(t: Any) -> dict[str, torch.Tensor]:
    opt = t.strategy.optimizer_state_dict(t.optimizers[0])["state"]
    return {**t.strategy.module_state_dict(),
            **{f"opt.{n}.{k}": v for n, s in opt.items() for k, v in s.items() if torch.is_tensor(v)}}


def checkpoints(root: str) -> None:
    """2 x 2 save at step 3 → resume on 2 x 2 bit-exact (shuffled data, AdamW); load on 4 x 1 equal."""
    path = os.path.join(root, "mp-step3")
    saver = SaveAt(path, 3)
    t = trainer(strategy=mesh(), devices=4, max_epochs=2, callbacks=[saver])
    t.fit(TPModel("adamw"), loader(shuffle=True))
    expected = _state(t)
    resumed = trainer(strategy=mesh(), devices=4, max_epochs=2)
    resumed.fit(TPModel("adamw"), loader(shuffle=True), ckpt_path=path)
    actual = _state(resumed)
    assert resumed.global_step == t.global_step == 16 and actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key

    # save_distributed_checkpoint=False: one full state gathered to rank 0, loaded back into a 2 x 2 mesh
    full = os.path.join(root, "mp-full")
    t = trainer(strategy=mesh(save_distributed_checkpoint=False), devices=4, max_steps=2)
    t.fit(TPModel("adamw"), loader())
    t.save_checkpoint(full)
    back = trainer(strategy=mesh(), devices=4, max_steps=2)
    back.fit(TPModel("adamw"), loader(), ckpt_path=full)
    assert_close(back.strategy.module_state_dict(), t.strategy.module_state_dict(), tol=0)
    assert _state(back).keys() == _state(t).keys()

    # the same checkpoint on a 4 x 1 mesh (no tensor parallelism): model and optimizer state resharded by
    # DCP. Through the strategy: a 4 x 1 *fit* would change the global batch (2 x 2 -> 4 x 2), which resuming
    # refuses (framework.reshard); loading weights and optimizer state is what differs between the meshes.
    strategy = mesh(dp=4, tp=1)
    strategy.configure_topology("cpu", 4, 1)
    strategy.setup_environment()
    module = TPModel("adamw", tp=False)
    strategy.setup_module(module)
    optimizer = module.configure_optimizers()
    strategy.load_checkpoint(path, optimizers=[optimizer])
    assert_close(strategy.module_state_dict(), saver.model, tol=0)
    got = strategy.optimizer_state_dict(optimizer)["state"]
    for name, state in saver.optim.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(got[name][key]), torch.as_tensor(value)), (name, key)
    if int(os.environ["RANK"]) == 0:
        torch.save(saver.model, os.path.join(root, "mp-step3.pt"))


class SyncProbe(Callback):
    """Records whether DDP would all-reduce in each backward (False inside an accumulation window)."""

    def __init__(self) -> None:
        self.syncs: list[bool] = []

    def on_after_backward(self, trainer, module):
        self.syncs.append(trainer.strategy.model.require_backward_grad_sync)


def compiled() -> None:
    """compile (aot_eager) == one process: on the 2 x 2 mesh (each FSDP block's forward compiled after TP),
    under FSDP on 4 ranks (per block), and under DDP on 4 ranks with accumulation windows (no_sync still
    skips the all-reduce)."""
    from torch.nn.parallel import DistributedDataParallel

    from strategies import DDPStrategy, FSDPStrategy

    aot = {"backend": "aot_eager"}
    module = TPModel("sgd")
    t = trainer(strategy=mesh(), devices=4, max_steps=4, compile=aot)
    t.fit(module, loader())
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in module.blocks)
    state = t.strategy.module_state_dict()
    assert not any("_orig_mod" in k for k in state)
    assert_close(state, reference("sgd", global_batches(t, module)))

    module = TPModel("sgd", tp=False)  # plain FSDP over 4 ranks, one shard group per block: blocks compiled
    t = trainer(strategy=FSDPStrategy(auto_wrap_policy={Block}), devices=4, max_steps=2, compile=aot)
    t.fit(module, loader())
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in module.blocks)
    seen = t.strategy.all_gather_object(module.seen)
    assert_close(t.strategy.module_state_dict(), reference("sgd", [sum(step, []) for step in zip(*seen)]))

    module, probe = TPModel("adamw", tp=False), SyncProbe()
    t = trainer(strategy=DDPStrategy(), devices=4, max_steps=2, accumulate_grad_batches=2, compile=aot,
                callbacks=[probe])
    t.fit(module, loader())
    assert type(t.strategy.model) is DistributedDataParallel and hasattr(module.forward, "_torchdynamo_orig_callable")
    assert probe.syncs == [False, True] * 2, probe.syncs
    seen = t.strategy.all_gather_object(module.seen)
    steps = [sum((rank[i] + rank[i + 1] for rank in seen), []) for i in range(0, 4, 2)]
    assert_close({k: v for k, v in module.state_dict().items()}, reference("adamw", steps))


class NoConfigure(TPModel):
    configure_model = TrainModule.configure_model


def refusal() -> None:
    """tensor_parallel_size=2 without configure_model: a clear ValueError on every rank, before any collective."""
    try:
        trainer(strategy=mesh(), devices=4, max_steps=1).fit(NoConfigure(), loader())
    except ValueError as exc:
        assert "configure_model" in str(exc) and "parallelize_module" in str(exc), exc
    else:
        raise AssertionError("TP without configure_model was accepted")


def readme_example(root: str) -> None:
    """The docs' 2-D parallelism example, run as written (docs/concepts/strategies.md, its ``python`` block under
    'Tensor and data parallelism')."""
    os.chdir(root)  # the example writes logs and checkpoints to the working directory
    page = (Path(__file__).resolve().parents[2] / "docs" / "concepts" / "strategies.md").read_text()
    section = page.split("## Tensor and data parallelism", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "docs/concepts/strategies.md#tensor-and-data-parallelism", "exec"), namespace)


def mesh_job(root: str) -> None:
    equivalence(root)
    checkpoints(root)
    compiled()
    refusal()
    readme_example(root)
