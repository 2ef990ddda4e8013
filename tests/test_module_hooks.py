"""The module's Lightning hooks do what they do in Lightning, and Kiln's numerics still hold when they are
overridden (optimizer_step, backward, optimizer_zero_grad, lr_scheduler_step, configure_gradient_clipping,
on_train_batch_start returning -1, hooks assigned on an instance, steps without batch_idx, ...)."""

from __future__ import annotations

import pytest
import torch

from callbacks import Callback


def _weights(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_optimizer_step_override_warms_up_the_learning_rate(make_trainer, tiny_module_cls, make_loader):
    """Lightning's documented warm-up: scale the LR, then step with the closure."""
    lrs = []

    class WarmUp(tiny_module_cls):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            for group in optimizer.param_groups:
                group["lr"] = 0.1 * min(1.0, (self.trainer.global_step + 1) / 4)
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step(closure=optimizer_closure)

    trainer = make_trainer(max_epochs=1)
    trainer.fit(WarmUp(), make_loader(24))
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1]) and trainer.global_step == 6


def test_optimizer_step_override_equals_the_default_with_accumulation(make_trainer, tiny_module_cls, make_loader):
    class Plain(tiny_module_cls):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            optimizer.step(closure=optimizer_closure)

    torch.manual_seed(0)
    default = tiny_module_cls()
    torch.manual_seed(0)
    custom = Plain()
    make_trainer(max_epochs=2, accumulate_grad_batches=2).fit(default, make_loader(20))
    make_trainer(max_epochs=2, accumulate_grad_batches=2).fit(custom, make_loader(20))
    assert torch.equal(_weights(default), _weights(custom))


def test_optimizer_step_that_skips_the_closure_is_refused(make_trainer, tiny_module_cls, make_loader):
    class Forgets(tiny_module_cls):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            pass

    with pytest.raises(RuntimeError, match="did not run the closure"):
        make_trainer().fit(Forgets(), make_loader(8))


def test_backward_override_gets_the_scaled_loss(make_trainer, tiny_module_cls, make_loader):
    seen = []

    class Custom(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            self.raw = super().training_step(batch, batch_idx)
            return self.raw

        def backward(self, loss, *args, **kwargs):
            seen.append((float(loss / self.raw), self.trainer.precision_plugin.scaler.get_scale()))
            loss.backward(*args, **kwargs)

    trainer = make_trainer(precision="16-mixed")
    trainer.fit(Custom(), make_loader(8))
    assert len(seen) == 2 and all(ratio == pytest.approx(scale) and scale > 1 for ratio, scale in seen)


def test_zero_grad_and_scheduler_and_clipping_overrides(make_trainer, tiny_module_cls, make_loader):
    calls = []

    class Hooks(tiny_module_cls):
        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            calls.append(("zero", batch_idx))
            optimizer.zero_grad()

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1), "interval": "step"}]

        def lr_scheduler_step(self, scheduler, metric):
            calls.append(("sched", self.trainer.global_step))
            scheduler.step()

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            calls.append(("clip", gradient_clip_val, gradient_clip_algorithm))
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)

    trainer = make_trainer(accumulate_grad_batches=2, gradient_clip_val=0.5, gradient_clip_algorithm="value")
    trainer.fit(Hooks(), make_loader(16))  # 4 batches: windows [0, 1] [2, 3]
    assert calls == [("zero", 0), ("clip", 0.5, "value"), ("sched", 1), ("zero", 2), ("clip", 0.5, "value"),
                     ("sched", 2)]
    assert trainer.grad_norm is not None


def test_on_train_batch_start_minus_one_ends_the_epoch(make_trainer, tiny_module_cls, make_loader):
    seen = []

    class Stops(tiny_module_cls):
        def on_train_batch_start(self, batch, batch_idx):
            seen.append((self.current_epoch, batch_idx))
            return -1 if batch_idx == 2 else None

    trainer = make_trainer(max_epochs=2)
    trainer.fit(Stops(), make_loader(20))
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)] and trainer.global_step == 4


def test_hooks_assigned_on_an_instance_are_called(make_trainer, tiny_module_cls, make_loader):
    calls = []
    module = tiny_module_cls()
    module.on_train_epoch_start = lambda: calls.append("epoch_start")
    module.on_before_zero_grad = lambda optimizer: calls.append("zero")
    make_trainer().fit(module, make_loader(8))
    assert calls == ["epoch_start", "zero", "zero"]


def test_validation_step_none_disables_validation(make_trainer, tiny_module_cls, make_loader):
    class Counting(Callback):
        def __init__(self):
            self.runs = 0

        def on_validation_start(self, trainer, module):
            self.runs += 1

    module, counter = tiny_module_cls(), Counting()
    module.validation_step = None
    make_trainer(callbacks=[counter], num_sanity_val_steps=2).fit(module, make_loader(8), make_loader(8))
    assert counter.runs == 0


def test_steps_without_batch_idx(make_trainer, tiny_module_cls, make_loader):
    class NoIndex(tiny_module_cls):
        def training_step(self, batch):
            return self.loss(batch)

        def validation_step(self, batch):
            self.log("val_loss", self.loss(batch))

    trainer = make_trainer()
    trainer.fit(NoIndex(), make_loader(8), make_loader(8))
    assert "val_loss" in trainer.callback_metrics and trainer.global_step == 2


def test_configure_callbacks_replaces_trainer_callbacks_of_the_same_type(make_trainer, tiny_module_cls, make_loader):
    from callbacks import EarlyStopping

    mine = EarlyStopping(monitor="val_loss", patience=7)

    class WithCallbacks(tiny_module_cls):
        def configure_callbacks(self):
            return [mine]

    trainer = make_trainer(callbacks=[EarlyStopping(monitor="val_loss", patience=1)])
    trainer.fit(WithCallbacks(), make_loader(8), make_loader(8))
    stoppers = [cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping)]
    assert stoppers == [mine]


def test_on_save_checkpoint_keys_come_back_and_reserved_keys_are_guarded(make_trainer, tiny_module_cls, make_loader,
                                                                         tmp_path):
    loaded = {}

    class Extra(tiny_module_cls):
        def on_save_checkpoint(self, checkpoint):
            assert {"state_dict", "epoch", "global_step", "optimizer_states", "lr_schedulers", "callbacks",
                    "loops"} <= set(checkpoint)
            checkpoint["my_tensor"] = torch.arange(3)
            checkpoint["my_note"] = {"text": "hello", "n": 2}

        def on_load_checkpoint(self, checkpoint):
            loaded.update({key: checkpoint[key] for key in ("my_tensor", "my_note", "global_step")})

    trainer = make_trainer()
    trainer.fit(Extra(), make_loader(8))
    trainer.save_checkpoint(str(tmp_path / "ckpt"))
    make_trainer(max_epochs=2).fit(Extra(), make_loader(8), ckpt_path=str(tmp_path / "ckpt"))
    assert torch.equal(loaded["my_tensor"], torch.arange(3)) and loaded["my_note"] == {"text": "hello", "n": 2}
    assert loaded["global_step"] == 2

    class Replaces(tiny_module_cls):
        def on_save_checkpoint(self, checkpoint):
            checkpoint["state_dict"] = {}

    trainer = make_trainer()
    trainer.fit(Replaces(), make_loader(8))
    with pytest.raises(ValueError, match=r"on_save_checkpoint replaced or removed \['state_dict'\]"):
        trainer.save_checkpoint(str(tmp_path / "bad"))


def test_manual_optimization_refuses_trainer_accumulation(make_trainer, tiny_module_cls, make_loader):
    class Manual(tiny_module_cls):
        automatic_optimization = False

        def training_step(self, batch, batch_idx):
            self.manual_backward(self.loss(batch))
            self.optimizers().step()

    with pytest.raises(ValueError, match=r"accumulate_grad_batches=\{0: 2\} does nothing under manual optimization"):
        make_trainer(accumulate_grad_batches=2).fit(Manual(), make_loader(8))


def test_a_hook_that_only_adds_keys_never_builds_the_model_state(make_trainer, tiny_module_cls, make_loader, tmp_path):
    class AddsOnly(Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["note"] = "x"

    trainer = make_trainer(callbacks=[AddsOnly()])
    trainer.fit(tiny_module_cls(), make_loader(8))
    calls = []
    original = trainer.strategy.module_state_dict
    trainer.strategy.module_state_dict = lambda: calls.append(1) or original()
    trainer.save_checkpoint(str(tmp_path / "ckpt"))
    assert calls == [1]  # the strategy's own save only; the hook's view never built a second one


def test_callback_metrics_is_the_live_dict_and_limits_are_visible(make_trainer, tiny_module_cls, make_loader):
    trainer = make_trainer(limit_train_batches=3, limit_val_batches=0.5)
    trainer.fit(tiny_module_cls(), make_loader(8))
    trainer.callback_metrics["set_by_a_callback"] = torch.tensor(1.0)
    assert trainer.callback_metrics["set_by_a_callback"] == 1.0
    assert (trainer.limit_train_batches, trainer.limit_val_batches) == (3, 0.5)
