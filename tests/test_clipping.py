"""Gradient clipping: "norm" and "value", once per optimizer step, on unscaled gradients, trainer.grad_norm."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks import Callback
from framework import TrainModule

LR = 0.5


def regression_data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.3 + 0.01 * torch.randn(n, 1, generator=g))


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it actually applies (after unscaling and clipping)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.applied: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.applied.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


class Regressor(TrainModule):
    def __init__(self, bad_batch: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.bad_batch = bad_batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = mse(self.net, batch)
        return loss * 1e8 if batch_idx == self.bad_batch else loss

    def configure_optimizers(self) -> Any:
        return RecordingSGD(self.parameters(), lr=LR)


def mse(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


class NormRecorder(Callback):
    """``trainer.grad_norm`` after every batch that closed a window."""

    def __init__(self) -> None:
        self.norms: list[torch.Tensor | None] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.sync_gradients:
            norm = trainer.grad_norm
            self.norms.append(None if norm is None else norm.detach().clone())


def count_clip_calls(trainer) -> list[int]:
    """Count calls to the strategy's clip_gradients (the real one still runs)."""
    calls = [0]
    original = trainer.strategy.clip_gradients

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    trainer.strategy.clip_gradients = counting
    return calls


def reference(initial: torch.nn.Module, windows: list[list[Any]], clip_val: float, algorithm: str):
    """SGD on each concatenated window, clipping the window's gradient once; returns (model, pre-clip norms)."""
    model = copy.deepcopy(initial)
    norms = []
    for window in windows:
        batch = tuple(torch.cat(parts) for parts in zip(*window))
        model.zero_grad()
        mse(model, batch).backward()
        params = list(model.parameters())
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, clip_val)
        with torch.no_grad():
            for p in params:
                p -= LR * p.grad
    return model, norms


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize(("algorithm", "clip_val"), [("norm", 0.05), ("value", 0.02)])
def test_clipping_matches_reference_once_per_step(make_trainer, algorithm, clip_val, accumulate):
    dataset = regression_data(n=20)
    module = Regressor()
    initial = copy.deepcopy(module.net).double()
    recorder = NormRecorder()
    trainer = make_trainer(precision="64-true", gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm,
                           accumulate_grad_batches=accumulate, callbacks=[recorder])
    calls = count_clip_calls(trainer)
    trainer.fit(module, DataLoader(dataset, batch_size=2))  # 10 batches

    x, y = (t.double() for t in dataset.tensors)
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 20, 2)]
    windows = [batches[i:i + accumulate] for i in range(0, 10, accumulate)]
    expected, expected_norms = reference(initial, windows, clip_val, algorithm)

    assert calls[0] == len(windows) == trainer.global_step
    for p, q in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.stack(recorder.norms), torch.stack(expected_norms), atol=1e-10, rtol=0)
    # The clip was active: the reference without clipping lands somewhere else.
    unclipped, _ = reference(initial, windows, 1e9, "norm")
    assert not torch.allclose(unclipped[0].weight, module.net[0].weight, atol=1e-6)
    for grads in trainer.optimizers[0].applied:
        if algorithm == "norm":
            assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= clip_val * (1 + 1e-6)
        else:
            assert max(g.abs().max() for g in grads) <= clip_val


@pytest.mark.parametrize(("algorithm", "clip_val"), [("norm", 0.05), ("value", 0.02)])
def test_fp16_clips_true_gradients(make_trainer, algorithm, clip_val):
    """With 16-mixed the scaler unscales before clipping: applied gradients and norms match fp32."""
    runs = {}
    for precision in ("32-true", "16-mixed"):
        module, recorder = Regressor(), NormRecorder()
        trainer = make_trainer(precision=precision, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm,
                               callbacks=[recorder])
        trainer.fit(module, DataLoader(regression_data(), batch_size=4))
        assert trainer.skipped_steps == 0 and trainer.global_step == 6
        runs[precision] = trainer.optimizers[0].applied, torch.stack(recorder.norms)
    (applied32, norms32), (applied16, norms16) = runs["32-true"], runs["16-mixed"]
    torch.testing.assert_close(norms16, norms32, rtol=2e-2, atol=1e-4)
    assert (norms32 > clip_val).all(), "every step clipped, so the comparison exercises the clip"
    for grads16, grads32 in zip(applied16, applied32):
        for g16, g32 in zip(grads16, grads32):
            torch.testing.assert_close(g16, g32, rtol=2e-2, atol=clip_val * 2e-2)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_an_overflowed_step_still_skips_it(make_trainer, algorithm):
    module, recorder = Regressor(bad_batch=2), NormRecorder()
    trainer = make_trainer(precision="16-mixed", gradient_clip_val=0.05, gradient_clip_algorithm=algorithm,
                           callbacks=[recorder])
    trainer.fit(module, DataLoader(regression_data(), batch_size=4))
    assert trainer.skipped_steps == 1 and trainer.global_step == 6
    assert len(trainer.optimizers[0].applied) == 5  # the overflowed step never reached optimizer.step
    assert not torch.isfinite(recorder.norms[2])
    assert all(torch.isfinite(n) for i, n in enumerate(recorder.norms) if i != 2)
    assert all(torch.isfinite(p).all() for p in module.parameters())


class TwoOptimizers(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        self.total_norms: list[torch.Tensor] = []
        self._squares: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return mse(self.a, batch) + 2 * mse(self.b, batch)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Hooks run before clipping, so they see the gradients whose norm grad_norm reports.
        self._squares += [p.grad.pow(2).sum() for g in optimizer.param_groups for p in g["params"]]
        if len(self._squares) == 4:
            self.total_norms.append(torch.stack(self._squares).sum().sqrt())
            self._squares = []

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.a.parameters(), lr=LR), torch.optim.SGD(self.b.parameters(), lr=LR)]


def test_grad_norm_covers_every_optimizer(make_trainer):
    module, recorder = TwoOptimizers(), NormRecorder()
    trainer = make_trainer(precision="64-true", gradient_clip_val=0.05, callbacks=[recorder])
    trainer.fit(module, DataLoader(regression_data(), batch_size=4))
    torch.testing.assert_close(torch.stack(recorder.norms), torch.stack(module.total_norms), atol=1e-12, rtol=0)


def test_no_clipping_leaves_grad_norm_unset(make_trainer):
    module, recorder = Regressor(), NormRecorder()
    trainer = make_trainer(callbacks=[recorder])
    calls = count_clip_calls(trainer)
    trainer.fit(module, DataLoader(regression_data(), batch_size=4))
    assert calls[0] == 0 and recorder.norms == [None] * 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"gradient_clip_val": -1.0}, "gradient_clip_val"), ({"gradient_clip_val": float("inf")}, "gradient_clip_val"),
     ({"gradient_clip_val": "1"}, "gradient_clip_val"), ({"gradient_clip_algorithm": "l2"}, "gradient_clip_algorithm")],
)
def test_invalid_clipping_arguments_are_refused(make_trainer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(**kwargs)
