"""nan_policy: what a non-finite training loss does — "ignore" (default), "skip" the step, or "stop".

"skip" is checked against a run in which the bad window's batches return None (no gradients, so Adam leaves
parameters and moments alone): the two must end with identical weights and optimizer state. "stop" must
leave a checkpoint that, resumed, continues exactly like "skip".
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from callbacks import ModelCheckpoint
from callbacks.nan_policy import NonFiniteLossError
from framework.checkpoint import find_last, read_state
from framework.testing import require_distributed, run_distributed

BAD_BATCH = 2


def bad_module(base: type, bad: float | None = math.nan, skip_batches: tuple[int, ...] = (), scheduler: bool = False):
    """``base`` with Adam, whose loss at batch ``BAD_BATCH`` of epoch 0 is multiplied by ``bad``."""

    class Module(base):
        def training_step(self, batch, batch_idx):
            if self.trainer.current_epoch == 0 and batch_idx in skip_batches:
                return None
            loss = super().training_step(batch, batch_idx)
            if bad is not None and self.trainer.current_epoch == 0 and batch_idx == BAD_BATCH:
                loss = loss * bad
            return loss

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=0.05)
            if not scheduler:
                return optimizer
            step_lr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": step_lr, "interval": "step"}}

    torch.manual_seed(0)
    return Module()


def train(make_trainer, module, make_loader, **kwargs):
    trainer = make_trainer(max_epochs=2, **kwargs)
    trainer.fit(module, make_loader(num_samples=24))
    return trainer


def state(trainer, module) -> dict[str, torch.Tensor]:
    out = {f"w.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    for i, s in trainer.optimizers[0].state_dict()["state"].items():
        out.update({f"adam.{i}.{k}": torch.as_tensor(v).clone() for k, v in s.items()})
    return out


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_the_default_ignores_non_finite_losses_and_adds_nothing(make_trainer, tiny_module_cls, make_loader):
    trainer = make_trainer()
    assert trainer.nan_guard is None and not any(type(cb).__name__ == "NanGuard" for cb in trainer.callbacks)
    module = bad_module(tiny_module_cls)
    trainer = train(make_trainer, module, make_loader)
    assert trainer.fit_loop.step.nan_guard is None
    assert torch.isnan(module.layer.weight).all() and trainer.skipped_steps == 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_skip_equals_a_run_that_never_had_the_bad_window(make_trainer, tiny_module_cls, make_loader, precision,
                                                        bad, accumulate):
    window = tuple(range(BAD_BATCH // accumulate * accumulate, (BAD_BATCH // accumulate + 1) * accumulate))
    skipped = bad_module(tiny_module_cls, bad)
    trainer = train(make_trainer, skipped, make_loader, nan_policy="skip", precision=precision,
                    accumulate_grad_batches=accumulate)
    reference = bad_module(tiny_module_cls, None, skip_batches=window)
    ref_trainer = train(make_trainer, reference, make_loader, precision=precision, accumulate_grad_batches=accumulate)
    assert trainer.skipped_steps == 1 and trainer.global_step == ref_trainer.global_step == 12 // accumulate
    assert_equal_states(state(trainer, skipped), state(ref_trainer, reference))


def test_a_skipped_step_does_not_step_step_schedulers(make_trainer, tiny_module_cls, make_loader):
    trainer = train(make_trainer, bad_module(tiny_module_cls, scheduler=True), make_loader, nan_policy="skip")
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == 12 and trainer.skipped_steps == 1 and scheduler.last_epoch == 11
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.9**11)


def test_skip_with_the_fp16_scaler_leaves_its_scale_alone(make_trainer, tiny_module_cls, make_loader):
    from callbacks import Callback

    scales = {}

    class Scale(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            scales[batch_idx] = (trainer.precision_plugin.scaler.get_scale(), trainer.skipped_steps)

    module = bad_module(tiny_module_cls)
    make_trainer(max_steps=BAD_BATCH + 1, nan_policy="skip", precision="16-mixed", callbacks=[Scale()]).fit(
        module, make_loader(num_samples=24))
    assert scales[BAD_BATCH][0] == scales[BAD_BATCH - 1][0]  # the scaler saw no step: scale unchanged
    assert scales[BAD_BATCH][1] == scales[BAD_BATCH - 1][1] + 1
    assert torch.isfinite(module.layer.weight).all()


def test_batches_without_a_loss_are_not_bad(make_trainer, tiny_module_cls, make_loader):
    trainer = train(make_trainer, bad_module(tiny_module_cls, None, skip_batches=(0, 1, 2)), make_loader,
                    nan_policy="skip", accumulate_grad_batches=3)
    assert trainer.skipped_steps == 0 and trainer.global_step == 4


def test_stop_checkpoints_names_the_step_and_resumes_like_skip(make_trainer, tiny_module_cls, make_loader, tmp_path):
    module = bad_module(tiny_module_cls)
    trainer = make_trainer(max_epochs=2, nan_policy="stop", enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(save_top_k=0)])
    with pytest.raises(NonFiniteLossError, match=rf"global_step={BAD_BATCH} \(epoch 0, batch {BAD_BATCH}\)") as info:
        trainer.fit(module, make_loader(num_samples=24))
    exc = info.value
    assert isinstance(exc, RuntimeError) and exc.global_step == BAD_BATCH
    assert exc.checkpoint == find_last(str(tmp_path / "checkpoints")) and "was saved to" in str(exc)
    saved = read_state(exc.checkpoint, "model")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())

    skipped = bad_module(tiny_module_cls)
    skip_trainer = train(make_trainer, skipped, make_loader, nan_policy="skip")
    resumed = bad_module(tiny_module_cls, None)  # the cause fixed
    resume_trainer = make_trainer(max_epochs=2, nan_policy="stop")
    resume_trainer.fit(resumed, make_loader(num_samples=24), ckpt_path=exc.checkpoint)
    assert resume_trainer.skipped_steps == 1
    assert_equal_states(state(resume_trainer, resumed), state(skip_trainer, skipped))


def test_stop_without_checkpointing_says_nothing_was_saved(make_trainer, tiny_module_cls, make_loader):
    with pytest.raises(NonFiniteLossError, match="no checkpoint was saved") as info:
        train(make_trainer, bad_module(tiny_module_cls, math.inf), make_loader, nan_policy="stop")
    assert info.value.checkpoint is None


def tanh_module(base: type, lr: float = 0.05):
    """``base`` behind ``tanh``, with one ``inf`` input feature at batch ``BAD_BATCH`` of epoch 0: the loss stays
    finite (tanh(inf) = 1) but the weight gradient is 0 * inf = NaN."""

    class Module(base):
        def training_step(self, batch, batch_idx):
            x, y = batch
            bad = self.trainer.current_epoch == 0 and batch_idx == BAD_BATCH
            if bad:
                x = x.clone()
                x[0, 0] = math.inf
            z = (x * self.layer.weight).sum(-1, keepdim=True) + self.layer.bias  # elementwise: inf * w = ±inf
            loss = torch.nn.functional.mse_loss(torch.tanh(z), y)
            assert torch.isfinite(loss) or not bad
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    torch.manual_seed(0)
    return Module()


def test_nan_gradients_under_a_finite_loss_poison_the_weights_by_default(make_trainer, tiny_module_cls, make_loader):
    module = tanh_module(tiny_module_cls)
    train(make_trainer, module, make_loader)
    assert torch.isnan(module.layer.weight).any()


def test_skip_catches_nan_gradients_under_a_finite_loss(make_trainer, tiny_module_cls, make_loader):
    skipped = tanh_module(tiny_module_cls)
    trainer = train(make_trainer, skipped, make_loader, nan_policy="skip")
    assert trainer.skipped_steps == 1 and trainer.global_step == 12
    assert all(torch.isfinite(p).all() for p in skipped.parameters())

    class Reference(type(skipped)):
        def training_step(self, batch, batch_idx):
            if self.trainer.current_epoch == 0 and batch_idx == BAD_BATCH:
                return None
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    reference = Reference()
    train(make_trainer, reference, make_loader)
    assert all(torch.equal(a, b) for a, b in zip(skipped.parameters(), reference.parameters()))


def test_stop_fires_at_the_step_with_nan_gradients_and_saves_finite_weights(make_trainer, tiny_module_cls,
                                                                           make_loader, tmp_path):
    module = tanh_module(tiny_module_cls)
    trainer = make_trainer(max_epochs=2, nan_policy="stop", enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(every_n_epochs=None)])
    with pytest.raises(NonFiniteLossError, match=rf"gradients were not finite .* global_step={BAD_BATCH} ") as info:
        trainer.fit(module, make_loader(num_samples=24))
    saved = read_state(info.value.checkpoint, "model")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())


def test_weights_that_went_nan_anyway_stop_training_and_are_never_saved(make_trainer, tiny_module_cls, make_loader,
                                                                       tmp_path):
    """lr=NaN turns finite gradients into NaN weights: "skip" must not train on (skipping every later step), and
    no checkpoint may hold them."""
    module = tanh_module(tiny_module_cls, lr=math.nan)
    trainer = make_trainer(max_epochs=2, nan_policy="skip", enable_checkpointing=True,
                           callbacks=[ModelCheckpoint(every_n_train_steps=1, every_n_epochs=None)])
    with pytest.raises(NonFiniteLossError, match="refusing to save a checkpoint at global_step=1: the weights are"):
        trainer.fit(module, make_loader(num_samples=24))
    assert find_last(str(tmp_path / "checkpoints")) is None

    module = tanh_module(tiny_module_cls, lr=math.nan)
    with pytest.raises(NonFiniteLossError, match="weights are already NaN/inf at global_step=1") as info:
        train(make_trainer, module, make_loader, nan_policy="skip")
    assert info.value.checkpoint is None


def test_bad_policies_and_manual_optimization_are_refused(make_trainer, tiny_module_cls, make_loader):
    with pytest.raises(ValueError, match="nan_policy='drop' is not valid"):
        make_trainer(nan_policy="drop")

    class Manual(tiny_module_cls):
        automatic_optimization = False

    with pytest.raises(ValueError, match="needs automatic optimization"):
        make_trainer(nan_policy="skip").fit(Manual(), make_loader())


# ---- two ranks: a NaN on one rank skips the step on both -----------------------------------------------


def _one_rank_nan_job() -> None:
    from dist_common import Regression, loader

    from framework import Trainer

    class NanOnRank1(Regression):
        where = "loss"

        def training_step(self, batch, batch_idx):
            bad = self.trainer.global_rank == 1 and batch_idx == 1
            if bad and self.where == "grads":  # finite loss, NaN gradient: 0 * inf
                return super().training_step(batch, batch_idx) + torch.tanh(self.net[0].weight.sum() * math.inf)
            loss = super().training_step(batch, batch_idx)
            return loss * math.nan if bad else loss

    for where in ("loss", "grads"):
        module = NanOnRank1()
        module.where = where
        trainer = Trainer(devices=2, strategy="ddp", max_epochs=1, logger=False, enable_progress_bar=False,
                          enable_checkpointing=False, nan_policy="skip")
        trainer.fit(module, loader(16, 2))
        flat = torch.cat([p.detach().flatten() for p in module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.isfinite(flat).all() and torch.equal(gathered[0], gathered[1]), where
        assert (trainer.global_step, trainer.skipped_steps) == (4, 1), (where, trainer.global_step,
                                                                        trainer.skipped_steps)


@require_distributed
@pytest.mark.distributed
def test_a_nan_loss_or_gradient_on_one_rank_skips_the_step_on_every_rank():
    run_distributed(_one_rank_nan_job, nproc=2, timeout=120, stream=False,
                    env={"PYTHONPATH": os.path.join(os.path.dirname(__file__), "distributed")})
