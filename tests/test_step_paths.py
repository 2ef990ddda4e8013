"""The automatic step's paths give the same run: ``direct_step`` (also the strategy and precision plugin add
nothing: one device, 32-bit), ``plain_step`` (nothing optional overridden, one micro-batch per window) and the
general path (taken here because a no-op ``on_before_zero_grad`` is overridden)."""

from __future__ import annotations

import pytest
import torch

from framework.loops.step import AutomaticStep
from strategies.base import Strategy

_ADDS_NOTHING = Strategy.adds_nothing_to_steps


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
def test_direct_plain_and_general_paths_train_alike(modules, make_trainer, make_loader, monkeypatch, returns,
                                                    precision, schedule):
    taken = []
    for name in ("direct_step", "plain_step"):
        method = getattr(AutomaticStep, name)
        monkeypatch.setattr(AutomaticStep, name, lambda self, *a, _m=method, _n=name: taken.append(_n) or _m(self, *a))
    Plain, General = modules
    variants = [(Plain, True), (Plain, False), (General, True)]  # (module, may the step be direct?)
    runs = []
    for cls, direct in variants:
        if not direct:
            monkeypatch.setattr(Strategy, "adds_nothing_to_steps", property(lambda self: False))
        torch.manual_seed(0)
        module = cls(returns, schedule)
        trainer = make_trainer(max_epochs=2, precision=precision)
        trainer.fit(module, make_loader(num_samples=24, batch_size=4))
        runs.append((module, trainer))
        monkeypatch.setattr(Strategy, "adds_nothing_to_steps", _ADDS_NOTHING)
    # each Plain run's 2 epochs x 6 batches; bf16-mixed refines the forward context, so never direct
    first = "direct_step" if precision == "32-true" else "plain_step"
    assert taken == [first] * 12 + ["plain_step"] * 12
    reference, t_reference = runs[0]
    for module, trainer in runs[1:]:
        for p, g in zip(reference.parameters(), module.parameters()):
            assert torch.equal(p, g)
        assert t_reference.global_step == trainer.global_step == 12
        assert t_reference.callback_metrics.keys() == trainer.callback_metrics.keys()
        for key, value in t_reference.callback_metrics.items():
            assert torch.equal(value, trainer.callback_metrics[key]), key
        reference_state, state = t_reference.optimizers[0].state_dict(), trainer.optimizers[0].state_dict()
        assert reference_state["param_groups"] == state["param_groups"]
        for key, per_param in reference_state["state"].items():
            for name, value in per_param.items():
                assert torch.equal(value, state["state"][key][name]), name


def test_only_a_strategy_and_plugin_that_add_nothing_allow_the_direct_step():
    from framework.precision import MixedPrecision, Precision
    from strategies import DDPStrategy, SingleDeviceStrategy

    class Clipping(Precision):
        def optimizer_step(self, optimizer, closure=None, **kwargs):
            return super().optimizer_step(optimizer, closure, **kwargs)

    single = SingleDeviceStrategy()
    assert single.adds_nothing_to_steps and Precision().adds_nothing_to_steps
    single.precision = Clipping()
    assert not single.adds_nothing_to_steps
    single.precision = MixedPrecision(torch.bfloat16, "cpu")
    assert not single.adds_nothing_to_steps
    assert not DDPStrategy().adds_nothing_to_steps  # it refines no_sync


def test_gradient_clipping_and_accumulation_take_the_general_path(tiny_module_cls, make_trainer, make_loader,
                                                                 monkeypatch):
    taken = []
    monkeypatch.setattr(AutomaticStep, "plain_step", lambda self, *a: taken.append("plain"))
    monkeypatch.setattr(AutomaticStep, "direct_step", lambda self, *a: taken.append("direct"))
    make_trainer(gradient_clip_val=0.5).fit(tiny_module_cls(), make_loader())
    make_trainer(accumulate_grad_batches=2).fit(tiny_module_cls(), make_loader())
    assert taken == []
