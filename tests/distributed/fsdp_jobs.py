"""Jobs run on two gloo ranks by tests/test_fsdp.py (through framework.testing.run_distributed)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from dist_common import (
    ManualRegression,
    Regression,
    assert_close,
    chunks,
    dataset,
    loader,
    reference_sgd,
    trainer,
)
from torch import nn

from callbacks import Callback
from strategies import DDPStrategy, FSDPStrategy


def _fsdp(**kwargs: Any) -> FSDPStrategy:
    return FSDPStrategy(accelerator="cpu", devices=2, **kwargs)


def equivalence_job() -> None:
    """Two ranks x B == one process x 2B (SGD, 1e-5), with per-Linear shard groups, clipping on DTensor
    gradients, accumulation with gradient sync off inside windows, and uneven evaluation."""
    from torch.distributed.tensor import DTensor

    data = dataset(16)
    module = Regression()
    t = trainer(strategy=_fsdp(auto_wrap_policy={nn.Linear}), max_epochs=2, gradient_clip_val=0.3)
    t.fit(module, loader(16, 2))
    assert all(isinstance(p, DTensor) for p in module.parameters())
    assert isinstance(t.optimizers[0].param_groups[0]["params"][0], DTensor)  # optimizer built on the shards
    expected = reference_sgd(Regression(), [[ids] for ids in chunks(list(range(16)), 4)] * 2, data=data, clip=0.3)
    assert_close(t.strategy.module_state_dict(), expected)
    assert float(t.grad_norm) > 0.3  # clipping was active

    manual = ManualRegression()  # backward inside the root's forward
    manual.clip = 0.3
    t_manual = trainer(strategy=_fsdp(), max_epochs=2)
    t_manual.fit(manual, loader(16, 2))
    assert_close(t_manual.strategy.module_state_dict(), expected)

    # uneven evaluation: 9 samples, ranks run 3 and 2 batches; every all-gather is matched, metric exact
    x, y, _ = dataset(9)[:]
    full = Regression()
    full.load_state_dict(t.strategy.module_state_dict())
    exact = nn.functional.mse_loss(full(x), y).item()
    (metrics,) = t.validate(module, loader(9, 2))
    assert abs(metrics["val_loss"] - exact) < 1e-5, (metrics, exact)

    # uneven training (even_batches=False): rank 1 runs a ghost step that all-gathers but adds nothing
    module = Regression()
    t = trainer(strategy=_fsdp(auto_wrap_policy={nn.Linear}), even_batches=False)
    t.fit(module, loader(9, 2))
    nine = dataset(9)
    assert_close(t.strategy.module_state_dict(),
                 reference_sgd(Regression(), [[[0, 2], [1, 3]], [[4, 6], [5, 7]], [[8]]], data=nine))

    # accumulation: B=1 per rank, windows of 2 == batches of 4; sync disabled inside the window
    module = Regression()
    syncs: list[bool] = []

    class SyncProbe(Callback):
        def on_after_backward(self, trainer, module):
            syncs.append(not trainer.strategy._sync_disabled)

    t = trainer(strategy=_fsdp(), accumulate_grad_batches=2, callbacks=[SyncProbe()])
    t.fit(module, loader(16, 1))
    assert syncs == [False, True] * 4, syncs
    expected = reference_sgd(Regression(), [[ids] for ids in chunks(list(range(16)), 4)], data=data)
    assert_close(t.strategy.module_state_dict(), expected)


class Wide(Regression):
    """Regression with large layers (dims divisible by the world size) and Adam, for memory accounting."""

    def __init__(self) -> None:
        super().__init__(hidden=256)
        self.net.insert(2, nn.Linear(256, 256))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _local_numel(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    def numel(t: torch.Tensor) -> int:
        return (t.to_local() if hasattr(t, "to_local") else t).numel()

    params = sum(numel(p) for p in module.parameters())
    states = sum(numel(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return params + states


def memory(out_file: str) -> None:
    """Per-rank parameter + optimizer numel under FSDP vs DDP after one Adam step."""
    numels = {}
    for name, strategy in (("ddp", DDPStrategy(devices=2)), ("fsdp", _fsdp(auto_wrap_policy={nn.Linear}))):
        module = Wide()
        t = trainer(strategy=strategy, max_steps=1, max_epochs=None)
        t.fit(module, loader(8, 2))
        numels[name] = _local_numel(module, t.optimizers[0])
    ratio = numels["fsdp"] / numels["ddp"]
    if int(os.environ["RANK"]) == 0:
        with open(out_file, "w") as f:
            f.write(f"{numels['fsdp']} {numels['ddp']} {ratio:.4f}\n")
    assert ratio <= 0.55, numels


class Tied(Regression):
    """An embedding whose weight is also the output projection (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        return nn.functional.cross_entropy(self.head(torch.tanh(self.embed(tokens))), targets)


class MetaInit(Regression):
    """Layers built on the meta device in configure_model: FSDP allocates only the shards."""

    def __init__(self) -> None:
        super().__init__()
        del self.net

    def configure_model(self) -> None:
        with torch.device("meta"):
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def tied_precision_memory_job(out_file: str) -> None:
    """Tied weights train under FSDP (and stay tied); 16-mixed uses a ShardedGradScaler; bf16-mixed casts;
    per-rank memory is about half of DDP's; meta-device models are materialised shard by shard."""
    memory(out_file)

    module = MetaInit()
    t = trainer(strategy=_fsdp(auto_wrap_policy={nn.Linear}))
    t.fit(module, loader(8, 2))
    state = t.strategy.module_state_dict()
    assert not any(v.is_meta for v in state.values()) and all(torch.isfinite(v).all() for v in state.values())
    assert state["net.0.weight"].std() > 0 and t.global_step == 2
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    g = torch.Generator().manual_seed(3)
    tokens, targets = torch.randint(0, 6, (8,), generator=g), torch.randint(0, 6, (8,), generator=g)
    module = Tied()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(strategy=_fsdp(auto_wrap_policy={nn.Embedding, nn.Linear}))
        t.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, targets), batch_size=2))
    assert any("shared with modules outside" in str(w.message) for w in caught)
    assert module.head.weight is module.embed.weight
    reference = Tied()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for i in range(0, 8, 4):
        optimizer.zero_grad()
        reference.training_step((tokens[i:i + 4], targets[i:i + 4]), 0).backward()
        optimizer.step()
    state = t.strategy.module_state_dict()
    assert torch.equal(state["head.weight"], state["embed.weight"])
    torch.testing.assert_close(state["embed.weight"], reference.embed.weight.detach(), atol=1e-5, rtol=1e-5)

    module = Regression()
    t = trainer(strategy=_fsdp(auto_wrap_policy={nn.Linear}), precision="16-mixed", gradient_clip_val=1.0)
    t.fit(module, loader(8, 2))
    assert isinstance(t.precision_plugin.scaler, ShardedGradScaler) and t.global_step == 2
    assert all(torch.isfinite(v).all() for v in t.strategy.module_state_dict().values())

    module = Regression()
    t = trainer(strategy=_fsdp(), precision="bf16-mixed")
    assert t.strategy.mixed_precision_policy().param_dtype == torch.bfloat16
    t.fit(module, loader(8, 2))
    assert all(p.dtype == torch.float32 for p in module.parameters())  # sharded masters stay fp32


class AdamRegression(Regression):
    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class SaveAt(Callback):
    """Save a checkpoint (collectively) once ``global_step`` reaches ``step``."""

    def __init__(self, path: str, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not os.path.exists(self.path):
            trainer.save_checkpoint(self.path)
            self.saved = {k: v.clone() for k, v in trainer.strategy.module_state_dict().items()}


def _final_state(t) -> dict[str, torch.Tensor]:
    opt = t.strategy.optimizer_state_dict(t.optimizers[0])["state"]
    flat = {f"opt.{name}.{k}": v for name, s in opt.items() for k, v in s.items() if torch.is_tensor(v)}
    return {**t.strategy.module_state_dict(), **flat}


def checkpoint_job(root: str) -> None:
    """Sharded (DCP) and full checkpoints: save at step 3, resume in a fresh Trainer, bit-exact at the end."""
    for kind in ("sharded", "full"):
        path = os.path.join(root, kind)
        strategy = _fsdp(auto_wrap_policy={nn.Linear}, state_dict_type=kind)
        saver = SaveAt(path, 3)
        t = trainer(strategy=strategy, max_epochs=2, callbacks=[saver])
        t.fit(AdamRegression(), loader(16, 2, shuffle=True))
        expected = _final_state(t)

        resumed = trainer(strategy=_fsdp(auto_wrap_policy={nn.Linear}, state_dict_type=kind), max_epochs=2)
        resumed.fit(AdamRegression(), loader(16, 2, shuffle=True), ckpt_path=path)
        actual = _final_state(resumed)
        assert resumed.global_step == 8 and actual.keys() == expected.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), (kind, key)
        if int(os.environ["RANK"]) == 0:
            torch.save(saver.saved, os.path.join(root, f"{kind}-step3.pt"))
