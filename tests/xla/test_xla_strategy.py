"""XLAStrategy on torch_xla's PJRT CPU device: training matches a CPU reference, evaluation, the graph
and host-transfer discipline, collectives at world size 1, checkpoint → resume in a fresh process, and
XLA RNG capture."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch_xla  # conftest skips this folder when torch_xla is missing
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
from torch.utils.data import DataLoader, TensorDataset

from framework import Trainer, TrainModule, seed_everything
from framework.rng import capture_rng_state, restore_rng_state
from strategies import XLAStrategy

HERE = Path(__file__).parent


class MLP(TrainModule):
    """A small regression MLP that records the device and dtype its steps saw."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.lr = lr
        self.seen: set[tuple[str, torch.dtype]] = set()

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        self.seen.add((x.device.type, out.dtype))
        return torch.nn.functional.mse_loss(out.float(), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def dataset(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))


def loader(n: int = 40, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=shuffle)


def full_loss(module: MLP) -> float:
    """MSE over the whole dataset, computed on a CPU copy."""
    copy = MLP()
    copy.load_state_dict({name: tensor.cpu() for name, tensor in module.state_dict().items()})
    x, y = dataset().tensors
    with torch.no_grad():
        return torch.nn.functional.mse_loss(copy.net(x), y).item()


def trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    defaults = dict(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    default_root_dir=str(tmp_path))
    return Trainer(**{**defaults, **kwargs})


def fit_pair(tmp_path: Path, **kwargs: Any) -> tuple[MLP, MLP, float]:
    """The same initial MLP fit on XLA and on CPU with identical settings; also the initial loss."""
    torch.manual_seed(0)
    on_xla, on_cpu = MLP(), MLP()
    on_cpu.load_state_dict(on_xla.state_dict())
    initial = full_loss(on_cpu)
    trainer(tmp_path, strategy="xla", **kwargs).fit(on_xla, loader())
    trainer(tmp_path, strategy="single_device", accelerator="cpu", **kwargs).fit(on_cpu, loader())
    return on_xla, on_cpu, initial


@pytest.mark.parametrize("kwargs", [
    {},
    {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5},  # 5 batches/epoch: a short tail window
], ids=["plain", "accumulate-clip"])
def test_fit_matches_cpu_reference_and_loss_decreases(tmp_path, kwargs):
    on_xla, on_cpu, initial = fit_pair(tmp_path, **kwargs)
    assert on_xla.seen == {("xla", torch.float32)}
    assert all(p.device.type == "xla" for p in on_xla.parameters())
    for (name, a), b in zip(on_xla.state_dict().items(), on_cpu.state_dict().values()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, msg=name)
    assert full_loss(on_xla) < 0.9 * initial


def test_validate_test_predict_match_cpu(tmp_path):
    torch.manual_seed(0)
    on_xla, on_cpu = MLP(), MLP()
    on_cpu.load_state_dict(on_xla.state_dict())
    xla_trainer, cpu_trainer = trainer(tmp_path, strategy="xla"), trainer(tmp_path, accelerator="cpu")
    for stage in ("validate", "test"):
        got = getattr(xla_trainer, stage)(on_xla, loader())
        want = getattr(cpu_trainer, stage)(on_cpu, loader())
        key = "val_loss" if stage == "validate" else "test_loss"
        assert got[0][key] == pytest.approx(want[0][key], rel=1e-5)
    predictions = xla_trainer.predict(on_xla, loader(batch_size=16))
    assert [p.shape[0] for p in predictions] == [16, 16, 8]
    assert all(p.device.type == "xla" for p in predictions)
    torch.testing.assert_close(torch.cat([p.cpu() for p in predictions]),
                               torch.cat(cpu_trainer.predict(on_cpu, loader(batch_size=16))))


def test_background_and_inline_loading_train_identically(tmp_path):
    results = []
    for parallel in (True, False):
        torch.manual_seed(0)
        module = MLP()
        trainer(tmp_path, strategy=XLAStrategy(parallel_loader=parallel)).fit(module, loader(shuffle=True))
        results.append({k: v.cpu() for k, v in module.state_dict().items()})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_stopping_mid_epoch_stops_the_background_loader(tmp_path):
    before = threading.active_count()
    module = MLP()
    trainer(tmp_path, strategy="xla", max_steps=2).fit(module, loader(n=400))  # 50 batches, 2 used
    assert threading.active_count() == before


def test_steady_state_steps_compile_nothing_new_and_read_nothing_back(tmp_path):
    """One graph per step: after warm-up, more steps neither compile nor transfer to the host."""
    def fit(steps: int) -> None:
        trainer(tmp_path, strategy="xla", max_epochs=None, max_steps=steps).fit(MLP(), loader(n=400))

    fit(3)
    compiles, transfers = met.metric_data("CompileTime")[0], (met.metric_data("TransferFromDeviceTime") or [0])[0]
    fit(30)
    assert met.metric_data("CompileTime")[0] == compiles
    assert (met.metric_data("TransferFromDeviceTime") or [0])[0] == transfers


def test_bf16_mixed_autocasts_on_xla(tmp_path):
    torch.manual_seed(0)
    module = MLP()
    trainer(tmp_path, strategy="xla", precision="bf16-mixed").fit(module, loader())
    assert module.seen == {("xla", torch.bfloat16)}
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert torch.isfinite(module.net[0].weight.cpu()).all()


def test_collectives_are_identities_at_world_size_one(tmp_path):
    strategy = XLAStrategy()
    strategy.setup_environment()
    assert (strategy.world_size, strategy.global_rank, strategy.root_device.type) == (1, 0, "xla")
    t = torch.arange(3.0, device=strategy.root_device)
    for op in ("mean", "sum", "max", "min"):
        assert torch.equal(strategy.all_reduce(t, op).cpu(), t.cpu())
    with pytest.raises(ValueError, match="op='avg'"):
        strategy.all_reduce(t, "avg")
    assert strategy.all_gather(t).shape == (1, 3)
    assert strategy.broadcast({"a": 1}) == {"a": 1}
    assert strategy.all_gather_object(5) == [5]
    assert strategy.reduce_boolean_decision(True) is True
    strategy.barrier()


def test_more_devices_than_the_runtime_has_is_refused(tmp_path):
    with pytest.raises(ValueError, match="xmp.spawn"):
        trainer(tmp_path, strategy="xla", devices=2).fit(MLP(), loader())


def test_xla_rng_round_trips_through_capture_and_restore():
    device = torch_xla.device()
    xm.set_rng_state(2**64 - 5)  # the XLA seed is a uint64: the largest values must survive
    torch.rand(3, device=device)
    state = capture_rng_state()
    assert "xla" in state
    first = torch.rand(5, device=device).cpu()
    torch.rand(7, device=device)
    torch_xla.sync()
    restore_rng_state(state)
    assert torch.equal(torch.rand(5, device=device).cpu(), first)


def test_xla_rng_state_survives_a_checkpoint_file(tmp_path):
    from framework.checkpoint import begin_checkpoint, commit_checkpoint, read_state, write_state

    xm.set_rng_state(2**64 - 5)
    state = capture_rng_state()
    staging = begin_checkpoint(str(tmp_path / "ckpt"))
    commit_checkpoint(staging, write_state(staging, "rng", state))
    assert read_state(str(tmp_path / "ckpt"), "rng")["xla"] == state["xla"]


def _load_job():
    spec = importlib.util.spec_from_file_location("xla_resume_job", HERE / "xla_resume_job.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.mark.parametrize("parallel_loader", [True, False], ids=["background-loader", "inline-loader"])
def test_checkpoint_resume_in_a_fresh_process_is_exact(tmp_path, parallel_loader):
    from safetensors.torch import load_file

    from framework.checkpoint import list_checkpoints, rank_state_name, read_state

    job = _load_job()
    uninterrupted = job.train(str(tmp_path / "a"), max_steps=8, parallel_loader=parallel_loader)
    saved = {m.global_step: m.path for m in list_checkpoints(str(tmp_path / "a" / "checkpoints"))}
    assert sorted(saved) == [3, 6]
    own = read_state(saved[3], rank_state_name(0))
    assert "xla" in own["callbacks"]["RNGCapture"]  # the XLA generator was captured

    out = tmp_path / "resumed.safetensors"
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    proc = subprocess.run([sys.executable, str(HERE / "xla_resume_job.py"), str(tmp_path / "b"), "8", saved[3],
                           str(out), str(int(parallel_loader))], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = load_file(str(out))
    assert set(resumed) == set(uninterrupted) - {"decode.weight"}
    for name, tensor in resumed.items():
        assert torch.equal(tensor, uninterrupted[name]), name


def test_seed_everything_seeds_the_xla_generator():
    device = torch_xla.device()
    seed_everything(3)
    a = torch.rand(4, device=device).cpu()
    seed_everything(3)
    assert torch.equal(torch.rand(4, device=device).cpu(), a)


def test_tied_weights_stay_tied_on_the_device(tmp_path):
    class Tied(MLP):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4),
                                           torch.nn.Tanh(), torch.nn.Linear(4, 1))
            self.net[2].weight = self.net[0].weight

    module = Tied()
    trainer(tmp_path, strategy="xla").fit(module, loader())
    assert module.net[2].weight is module.net[0].weight
    assert module.net[0].weight.device.type == "xla"
