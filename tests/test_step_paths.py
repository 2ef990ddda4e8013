"""The automatic step's two paths give the same run: ``plain_step`` (nothing optional overridden, one micro-batch
per window) and the general path (taken here because a no-op ``on_before_zero_grad`` is overridden)."""

from __future__ import annotations

import pytest
import torch

from framework.loops.step import AutomaticStep


@pytest.fixture
def modules(tiny_module_cls):
    class Plain(tiny_module_cls):
        def __init__(self, returns: str, schedule: bool) -> None:
            super().__init__()
            self.returns, self.schedule = returns, schedule

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("weight_sum", self.layer.weight.sum(), on_step=True, on_epoch=True, prog_bar=True)
            if self.returns == "dict":
                return {"loss": loss, "extra": batch_idx}
            if self.returns == "none_on_odd" and batch_idx % 2:
                return None
            return loss

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=0.05)
            if not self.schedule:
                return optimizer
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class General(Plain):
        def on_before_zero_grad(self, optimizer):  # overridden, so the general path runs
            pass

    return Plain, General


@pytest.mark.parametrize("returns", ["tensor", "dict", "none_on_odd"])
@pytest.mark.parametrize(("precision", "schedule"), [("32-true", True), ("bf16-mixed", False)])
def test_plain_and_general_paths_train_alike(modules, make_trainer, make_loader, monkeypatch, returns, precision,
                                             schedule):
    taken = []
    plain_step = AutomaticStep.plain_step
    monkeypatch.setattr(AutomaticStep, "plain_step", lambda self, *a: taken.append("plain") or plain_step(self, *a))
    runs = []
    for cls in modules:
        torch.manual_seed(0)
        module = cls(returns, schedule)
        trainer = make_trainer(max_epochs=2, precision=precision)
        trainer.fit(module, make_loader(num_samples=24, batch_size=4))
        runs.append((module, trainer))
    assert len(taken) == 12  # the plain module's 2 epochs x 6 batches, and none of the general one's
    (plain, t_plain), (general, t_general) = runs
    for p, g in zip(plain.parameters(), general.parameters()):
        assert torch.equal(p, g)
    assert t_plain.global_step == t_general.global_step == 12
    assert t_plain.callback_metrics.keys() == t_general.callback_metrics.keys()
    for key, value in t_plain.callback_metrics.items():
        assert torch.equal(value, t_general.callback_metrics[key]), key
    plain_state, general_state = t_plain.optimizers[0].state_dict(), t_general.optimizers[0].state_dict()
    assert plain_state["param_groups"] == general_state["param_groups"]
    for key, state in plain_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, general_state["state"][key][name]), name


def test_gradient_clipping_and_accumulation_take_the_general_path(tiny_module_cls, make_trainer, make_loader,
                                                                 monkeypatch):
    taken = []
    monkeypatch.setattr(AutomaticStep, "plain_step", lambda self, *a: taken.append("plain"))
    make_trainer(gradient_clip_val=0.5).fit(tiny_module_cls(), make_loader())
    make_trainer(accumulate_grad_batches=2).fit(tiny_module_cls(), make_loader())
    assert taken == []
