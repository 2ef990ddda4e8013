"""Manual optimization honours precision: manual_backward scales, opt.step() unscales, clips and skips."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from framework import TrainModule


def small_data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.3 + 0.01 * torch.randn(n, 1, generator=g))


class Manual(TrainModule):
    """Manual loop: backward, step, zero_grad; checks the gradients it sees at every stage."""

    def __init__(self, bad_batch: int = -1, step_scheduler: bool = False, clip: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(4, 1)
        self.bad_batch, self.step_scheduler, self.clip = bad_batch, step_scheduler, clip
        self.true_grads: list[list[torch.Tensor]] = []
        self.backward_grads: list[list[torch.Tensor]] = []
        self.scales: list[float] = []
        self.hook_grads: list[list[torch.Tensor]] = []
        self.params_before: list[list[torch.Tensor]] = []
        self.params_after: list[list[torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if batch_idx == self.bad_batch:
            loss = loss * 1e8
        params = list(self.parameters())
        self.true_grads.append([g.clone() for g in torch.autograd.grad(loss, params, retain_graph=True)])
        scaler = self.trainer.precision_plugin.scaler
        self.scales.append(scaler.get_scale() if scaler is not None else 1.0)
        self.manual_backward(loss)
        self.backward_grads.append([p.grad.clone() for p in params])
        self.params_before.append([p.detach().clone() for p in params])
        if self.clip is not None:  # Lightning's way under manual optimization: clip by hand before stepping
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad()
        self.params_after.append([p.detach().clone() for p in params])
        if self.step_scheduler:
            self.lr_schedulers().step()
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.hook_grads.append([p.grad.clone() for p in self.parameters()])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": step, "interval": "step"}}


def test_manual_backward_scales_and_step_unscales(make_trainer):
    module = Manual()
    trainer = make_trainer(precision="16-mixed")
    trainer.fit(module, DataLoader(small_data(), batch_size=4))
    assert trainer.global_step == 6 and trainer.skipped_steps == 0
    for true, scaled, seen, scale in zip(module.true_grads, module.backward_grads, module.hook_grads, module.scales):
        assert scale == 2.0**16
        for t, s, h in zip(true, scaled, seen):
            torch.testing.assert_close(s, t * scale, rtol=1e-3, atol=1e-3)  # manual_backward scaled the loss
            torch.testing.assert_close(h, t, rtol=1e-3, atol=1e-7)  # the hook and the step see true gradients


def test_manual_overflow_skips_the_step(make_trainer):
    module = Manual(bad_batch=2)
    trainer = make_trainer(precision="16-mixed")
    trainer.fit(module, DataLoader(small_data(), batch_size=4))
    assert trainer.skipped_steps == 1 and trainer.global_step == 6
    for before, after in zip(module.params_before[2], module.params_after[2]):
        assert torch.equal(before, after)
    assert module.scales[3] == module.scales[2] / 2 == 2.0**15
    for i in (0, 1, 3, 4, 5):
        assert not torch.equal(module.params_before[i][0], module.params_after[i][0])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    momentum = trainer.optimizers[0].state[module.layer.weight]["momentum_buffer"]
    assert torch.isfinite(momentum).all()


@pytest.mark.parametrize("step_scheduler", [False, True])
def test_manual_optimization_leaves_schedulers_to_the_user(make_trainer, step_scheduler):
    module = Manual(step_scheduler=step_scheduler)
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, DataLoader(small_data(), batch_size=4))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == 12
    assert scheduler.last_epoch == (12 if step_scheduler else 0)


def test_manual_clipping_on_true_gradients(make_trainer):
    with pytest.raises(ValueError, match=r"gradient_clip_val=0.001 does nothing under manual optimization.*"
                                         r"self.clip_gradients"):
        make_trainer(gradient_clip_val=1e-3).fit(Manual(), DataLoader(small_data(), batch_size=4))
    module = Manual(clip=1e-3)
    trainer = make_trainer(precision="16-mixed")
    trainer.fit(module, DataLoader(small_data(), batch_size=4))
    true_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in module.true_grads[-1]]))
    torch.testing.assert_close(trainer.grad_norm, true_norm, rtol=1e-2, atol=0)
    assert true_norm > 1e-3  # the clip was active
    step = [b - a for b, a in zip(module.params_before[0], module.params_after[0])]
    # First SGD step (no momentum history yet) is lr * clipped gradient, whose norm is the clip value.
    assert torch.linalg.vector_norm(torch.stack([s.norm() for s in step])) == pytest.approx(0.1 * 1e-3, rel=1e-2)
