"""Precision plugins: string resolution, dtypes in forward/params/inputs, fp16 overflow skipping, scaler state.

Everything runs on CPU: torch supports fp16 and bf16 autocast and ``torch.amp.GradScaler("cpu")`` there.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks import Callback
from framework import TrainModule
from framework.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision, resolve_precision


def small_data(n: int = 32, seed: int = 0) -> TensorDataset:
    """Inputs of magnitude ~0.1, so fp16 gradients at the default scale 2**16 do not overflow by themselves."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.01 * torch.randn(n, 1, generator=g),
                         torch.arange(n))


class Probe(TrainModule):
    """Records the dtypes seen inside training_step and validation_step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.dtypes: dict[str, set] = {"param": set(), "x": set(), "index": set(), "out": set(), "val_out": set(),
                                       "default": set()}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        out = self.layer(x)
        self.dtypes["param"].add(self.layer.weight.dtype)
        self.dtypes["x"].add(x.dtype)
        self.dtypes["index"].add(index.dtype)
        self.dtypes["out"].add(out.dtype)
        self.dtypes["default"].add(torch.get_default_dtype())
        return torch.nn.functional.mse_loss(out.float(), y.float())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.dtypes["val_out"].add(self.layer(batch[0]).dtype)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


# ---- resolution -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "cls", "name", "dtype"),
    [
        ("32-true", Precision, "32-true", None),
        ("32", Precision, "32-true", None),
        (32, Precision, "32-true", None),
        ("64-true", DoublePrecision, "64-true", torch.float64),
        ("16-mixed", MixedPrecision, "16-mixed", torch.float16),
        ("bf16-mixed", MixedPrecision, "bf16-mixed", torch.bfloat16),
        ("16-true", HalfPrecision, "16-true", torch.float16),
        ("bf16-true", HalfPrecision, "bf16-true", torch.bfloat16),
    ],
)
def test_resolve_precision_strings(value, cls, name, dtype):
    plugin = resolve_precision(value)
    assert type(plugin) is cls and plugin.name == name
    assert getattr(plugin, "dtype", None) == dtype
    has_scaler = name == "16-mixed"
    assert isinstance(plugin.scaler, torch.amp.GradScaler) is has_scaler


@pytest.mark.parametrize(("value", "hint"), [("16", "16-mixed"), ("bf16", "bf16-mixed"), ("fp8", None), (8, None)])
def test_unknown_precision_is_refused(make_trainer, value, hint):
    with pytest.raises(ValueError, match="precision=") as info:
        make_trainer(precision=value)
    assert "32-true" in str(info.value) and "Precision instance" in str(info.value)
    if hint:
        assert f"did you mean {hint!r}" in str(info.value)


@pytest.mark.parametrize("cls", [MixedPrecision, HalfPrecision])
def test_half_plugins_refuse_other_dtypes(cls):
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        cls(torch.float64)


# ---- dtypes during fit ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "param", "x", "out"),
    [
        ("32-true", torch.float32, torch.float32, torch.float32),
        ("64-true", torch.float64, torch.float64, torch.float64),
        ("16-true", torch.float16, torch.float16, torch.float16),
        ("bf16-true", torch.bfloat16, torch.bfloat16, torch.bfloat16),
        ("16-mixed", torch.float32, torch.float32, torch.float16),
        ("bf16-mixed", torch.float32, torch.float32, torch.bfloat16),
    ],
)
def test_dtypes_inside_steps(make_trainer, precision, param, x, out):
    module = Probe()
    trainer = make_trainer(precision=precision, limit_train_batches=3)
    loader = DataLoader(small_data(), batch_size=8)
    trainer.fit(module, loader, val_dataloaders=loader)
    assert module.dtypes == {"param": {param}, "x": {x}, "index": {torch.int64}, "out": {out}, "val_out": {out},
                             "default": {param}}  # tensors created inside a *-true step match the parameters
    assert torch.get_default_dtype() == torch.float32
    assert trainer.global_step == 3 and trainer.skipped_steps == 0
    assert all(p.dtype == param and torch.isfinite(p).all() for p in module.parameters())


class CountingPrecision(Precision):
    """A user plugin: fp32, counting every call the Trainer makes into it."""

    def __init__(self) -> None:
        self.calls = {"convert_module": 0, "forward_context": 0, "backward": 0, "optimizer_step": 0}

    def convert_module(self, module):
        self.calls["convert_module"] += 1
        return module

    @contextmanager
    def _context(self):
        yield

    def forward_context(self):
        self.calls["forward_context"] += 1
        return self._context()

    def backward(self, loss):
        self.calls["backward"] += 1
        super().backward(loss)

    def optimizer_step(self, optimizer):
        self.calls["optimizer_step"] += 1
        return super().optimizer_step(optimizer)


def test_custom_precision_instance_is_used(make_trainer):
    plugin = CountingPrecision()
    trainer = make_trainer(precision=plugin, accumulate_grad_batches=2)
    assert trainer.precision_plugin is plugin and trainer.strategy.precision is plugin
    trainer.fit(Probe(), DataLoader(small_data(), batch_size=8))
    assert plugin.calls == {"convert_module": 1, "forward_context": 4, "backward": 4, "optimizer_step": 2}


# ---- fp16 overflow -------------------------------------------------------------------------------------------


class Overflow(TrainModule):
    """Adam + a step-interval scheduler; the loss of batch ``bad_batch`` is multiplied by ``factor``."""

    def __init__(self, bad_batch: int = 2, factor: float = 1e8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.bad_batch, self.factor = bad_batch, factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        return loss * self.factor if batch_idx == self.bad_batch else loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class StepSnapshots(Callback):
    """Params, optimizer state, scale, LR and counters before and after every batch."""

    def __init__(self) -> None:
        self.before: list[dict] = []
        self.after: list[dict] = []

    def _snapshot(self, trainer, module) -> dict:
        optimizer = trainer.optimizers[0]
        scaler = trainer.precision_plugin.scaler
        return {
            "params": [p.detach().clone() for p in module.parameters()],
            "optimizer": copy.deepcopy(optimizer.state_dict()["state"]),
            "scale": scaler.get_scale() if scaler is not None else None,
            "lr": optimizer.param_groups[0]["lr"],
            "global_step": trainer.global_step,
            "skipped_steps": trainer.skipped_steps,
        }

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append(self._snapshot(trainer, module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(self._snapshot(trainer, module))


def full_loss(module: Overflow) -> float:
    x, y, _ = small_data().tensors
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(module.layer(x), y))


def assert_same_state(a: dict, b: dict) -> None:
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for key, state in a["optimizer"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"][key][name])), name


@pytest.mark.parametrize("factor", [1e8, math.nan, math.inf])
def test_fp16_overflow_skips_the_step(make_trainer, factor):
    module = Overflow(bad_batch=2, factor=factor)
    initial_loss = full_loss(module)
    snapshots = StepSnapshots()
    trainer = make_trainer(precision="16-mixed", callbacks=[snapshots])
    trainer.fit(module, DataLoader(small_data(), batch_size=4))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    before, after = snapshots.before, snapshots.after

    assert trainer.skipped_steps == 1 and trainer.global_step == 8
    bad_before, bad_after = before[2], after[2]
    assert bad_before["optimizer"], "Adam state exists before the bad step, so 'unchanged' is a real check"
    assert_same_state(bad_before, bad_after)
    assert bad_after["scale"] == bad_before["scale"] / 2
    assert bad_after["lr"] == bad_before["lr"], "the step-interval scheduler must not advance on a skipped step"
    assert bad_after["global_step"] == bad_before["global_step"] + 1

    for i in (0, 1, 3, 4, 5, 6, 7):  # every other step trains and advances the schedule
        assert not torch.equal(before[i]["params"][0], after[i]["params"][0])
        assert after[i]["lr"] == pytest.approx(before[i]["lr"] * 0.9)
        assert after[i]["scale"] == before[i]["scale"]
    assert scheduler.last_epoch == trainer.global_step - trainer.skipped_steps
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.isfinite(v).all() for s in trainer.optimizers[0].state.values() for v in s.values())
    assert full_loss(module) < 0.7 * initial_loss


def test_fp16_training_matches_fp32_without_overflow(make_trainer):
    """Scaling is invisible when nothing overflows: 16-mixed follows the fp32 trajectory to fp16 accuracy."""
    results = {}
    for precision in ("32-true", "16-mixed"):
        module = Overflow(bad_batch=-1)
        trainer = make_trainer(precision=precision, max_epochs=2)
        trainer.fit(module, DataLoader(small_data(), batch_size=4))
        assert trainer.skipped_steps == 0
        results[precision] = torch.cat([p.detach().flatten() for p in module.parameters()])
    torch.testing.assert_close(results["16-mixed"], results["32-true"], atol=2e-3, rtol=0)


def test_bf16_mixed_needs_no_scaler(make_trainer):
    module = Overflow(bad_batch=-1)
    trainer = make_trainer(precision="bf16-mixed")
    trainer.fit(module, DataLoader(small_data(), batch_size=4))
    assert trainer.precision_plugin.scaler is None and trainer.precision_plugin.state_dict() == {}
    assert trainer.skipped_steps == 0 and trainer.global_step == 8


# ---- scaler state ---------------------------------------------------------------------------------------------


def test_scaler_state_round_trips(make_trainer):
    trainer = make_trainer(precision="16-mixed")
    trainer.fit(Overflow(bad_batch=1), DataLoader(small_data(), batch_size=4))
    plugin = trainer.precision_plugin
    state = plugin.state_dict()
    assert state["scaler"]["scale"] == 2.0**15 and state["scaler"]["_growth_tracker"] == 6

    fresh = resolve_precision("16-mixed")
    assert fresh.scaler.get_scale() == 2.0**16
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    # The restored scale is the one the next backward uses.
    weight = torch.nn.Parameter(torch.ones(3))
    fresh.backward((weight * 2).sum())
    assert torch.equal(weight.grad, torch.full((3,), 2.0 * 2**15))
    # Loading into a scaler that has already been used overwrites its live state too.
    plugin.load_state_dict(resolve_precision("16-mixed").state_dict())
    assert plugin.scaler.get_scale() == 2.0**16 and plugin.state_dict()["scaler"]["_growth_tracker"] == 0


def test_stateless_plugins_accept_an_empty_state():
    for name in ("32-true", "64-true", "bf16-mixed", "16-true"):
        plugin = resolve_precision(name)
        assert plugin.state_dict() == {}
        plugin.load_state_dict({})


# ---- several optimizers share one scaler ---------------------------------------------------------------------


class TwoHeads(TrainModule):
    """Two independent regressors with one optimizer each; head ``a``'s loss blows up on ``bad_batch``."""

    def __init__(self, bad_batch: int, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        self.bad_batch = bad_batch
        self.automatic_optimization = not manual

    def losses(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = batch
        loss_a = torch.nn.functional.mse_loss(self.a(x), y)
        loss_b = torch.nn.functional.mse_loss(self.b(x), y)
        return (loss_a * 1e8 if batch_idx == self.bad_batch else loss_a), loss_b

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss_a, loss_b = self.losses(batch, batch_idx)
        if self.automatic_optimization:
            return loss_a + loss_b
        opt_a, opt_b = self.optimizers()
        self.manual_backward(loss_a)
        self.manual_backward(loss_b)
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
        return None

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.a.parameters(), lr=0.5), torch.optim.SGD(self.b.parameters(), lr=0.5)]


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_overflow_in_one_optimizer_leaves_the_other_exact(make_trainer, manual):
    """Each optimizer's gradients are unscaled with the scale they were produced with: the backoff caused by
    one optimizer's overflow lands after every optimizer of that iteration has stepped."""
    heads = {}
    for bad_batch in (-1, 2):
        module = TwoHeads(bad_batch, manual)
        trainer = make_trainer(precision="16-mixed")
        trainer.fit(module, DataLoader(small_data(), batch_size=4))
        heads[bad_batch] = module, trainer
    clean, clean_trainer = heads[-1]
    bad, bad_trainer = heads[2]
    steps_per_batch = 2 if manual else 1
    assert bad_trainer.skipped_steps == 1 and clean_trainer.skipped_steps == 0
    assert bad_trainer.global_step == clean_trainer.global_step == 8 * steps_per_batch
    assert bad_trainer.precision_plugin.scaler.get_scale() == 2.0**15
    # Head b never saw the blow-up: power-of-two scales make its fp16 arithmetic identical.
    for p, q in zip(bad.b.parameters(), clean.b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert not torch.allclose(bad.a.weight, clean.a.weight)
    assert all(torch.isfinite(p).all() for p in bad.parameters())


def test_scaler_state_is_part_of_trainer_checkpoints(make_trainer, tmp_path):
    """Fit 1 epoch (with a backoff), save, resume to 2 epochs == 2 epochs straight: params and scaler alike."""
    loader = DataLoader(small_data(), batch_size=4)
    straight = Overflow(bad_batch=1)
    straight_trainer = make_trainer(precision="16-mixed", max_epochs=2)
    straight_trainer.fit(straight, loader)

    first = make_trainer(precision="16-mixed", max_epochs=1)
    first.fit(Overflow(bad_batch=1), loader)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    resumed = Overflow(bad_batch=1)
    resumed_trainer = make_trainer(precision="16-mixed", max_epochs=2)
    resumed_trainer.fit(resumed, loader, ckpt_path=str(tmp_path / "ckpt"))

    assert straight_trainer.skipped_steps == resumed_trainer.skipped_steps == 2
    assert resumed_trainer.precision_plugin.state_dict() == straight_trainer.precision_plugin.state_dict()
    assert straight_trainer.precision_plugin.scaler.get_scale() == 2.0**14
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


class PartlyIdle(TrainModule):
    """Two heads; head ``b`` gets no gradient at all in some windows (its optimizer has nothing to step)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, _ = batch
        loss = torch.nn.functional.mse_loss(self.a(x), y)
        if batch_idx >= 4:
            loss = loss + torch.nn.functional.mse_loss(self.b(x), y)
        return loss

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]


def test_fp16_optimizer_without_gradients_is_not_an_error(make_trainer):
    module = PartlyIdle()
    b_initial = module.b.weight.detach().clone()
    trainer = make_trainer(precision="16-mixed", accumulate_grad_batches=2, max_epochs=2)
    trainer.fit(module, DataLoader(small_data(), batch_size=4))
    assert trainer.global_step == 8 and trainer.skipped_steps == 0
    assert not torch.equal(module.b.weight, b_initial)
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**16


def test_setup_sharded_keeps_the_scaler_state(tmp_path):
    import torch.distributed as dist

    plugin = resolve_precision("16-mixed")
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    plugin.backward((weight * torch.tensor([1.0, math.inf])).sum())
    assert plugin.optimizer_step(optimizer) is False
    state = plugin.state_dict()
    assert state["scaler"]["scale"] == 2.0**15

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        plugin.setup_sharded()
        assert type(plugin.scaler).__name__ == "ShardedGradScaler" and plugin.state_dict() == state
        optimizer.zero_grad()
        plugin.backward(weight.sum())
        assert plugin.optimizer_step(optimizer) is True
        plugin.finish_step()
        assert torch.equal(weight.detach(), torch.full((2,), 0.9))
    finally:
        dist.destroy_process_group()
