"""TrainModule: trainer-backed properties, training_step results (loss, dict, None, refusals), manual optimization."""

from __future__ import annotations

import copy

import pytest
import torch

from callbacks import Callback
from framework import TrainModule


# ---- properties ---------------------------------------------------------------------------------------
def test_properties_outside_a_trainer(tiny_module_cls):
    module = tiny_module_cls()
    assert module.device == torch.device("cpu")
    assert (module.global_step, module.current_epoch) == (0, 0)
    with pytest.raises(RuntimeError, match="not attached to a Trainer; call trainer.fit"):
        _ = module.trainer


def test_properties_during_fit(make_trainer, tiny_module_cls, make_loader):
    seen = []

    class M(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            seen.append((self.trainer, self.device, self.global_step, self.current_epoch))
            return super().training_step(batch, batch_idx)

    trainer = make_trainer(max_epochs=2)
    trainer.fit(M(), make_loader(8, batch_size=4))
    assert all(t is trainer and d == torch.device("cpu") for t, d, _, _ in seen)
    assert [(s, e) for _, _, s, e in seen] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert trainer.lightning_module is trainer.module


def test_module_stays_picklable_after_fit(make_trainer, tiny_module_cls, make_loader):
    module = tiny_module_cls()
    make_trainer().fit(module, make_loader())
    clone = copy.deepcopy(module)
    assert clone._trainer is None and torch.equal(clone.layer.weight, module.layer.weight)


def test_data_hooks_on_the_module(make_trainer, tiny_module_cls, make_loader):
    class M(tiny_module_cls):
        def train_dataloader(self):
            return make_loader(8, batch_size=4)

        def val_dataloader(self):
            return make_loader(12, batch_size=4)

        def test_dataloader(self):
            return make_loader(4, batch_size=4)

        def predict_dataloader(self):
            return make_loader(12, batch_size=6)

    trainer = make_trainer()
    module = M()
    trainer.fit(module)
    assert trainer.global_step == 2 and trainer.num_val_batches == [3]
    assert "test_loss" in trainer.test(module)[0]
    assert len(trainer.predict(module)) == 2


# ---- training_step results -------------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", [lambda loss: loss, lambda loss: {"loss": loss, "extra": 1}])
def test_loss_tensor_or_dict_trains(make_trainer, tiny_module_cls, make_loader, wrap):
    outputs = []

    class M(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            return wrap(self.loss(batch))

    class Keep(Callback):
        def on_train_batch_end(self, trainer, module, out, batch, batch_idx):
            outputs.append(out)

    module = M()
    before = module.layer.weight.detach().clone()
    make_trainer(callbacks=[Keep()]).fit(module, make_loader())
    assert not torch.equal(before, module.layer.weight)
    assert type(outputs[0]) is type(wrap(torch.zeros(())))  # on_train_batch_end sees what training_step returned


def test_none_skips_the_batch(make_trainer, tiny_module_cls, make_loader):
    """Skipping odd batches trains exactly like a loader without them (SGD without momentum)."""

    class SkipOdd(tiny_module_cls):
        def training_step(self, batch, batch_idx):
            if batch_idx % 2:
                return None if batch_idx % 4 == 1 else {"loss": None}
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    skipping, reference = SkipOdd(), tiny_module_cls()
    reference.load_state_dict(skipping.state_dict())
    loader = make_loader(32, batch_size=4)
    trainer = make_trainer()
    trainer.fit(skipping, loader)
    even_batches = [b for i, b in enumerate(loader) if i % 2 == 0]
    make_trainer().fit(reference, torch.utils.data.DataLoader(even_batches, batch_size=None))
    for a, b in zip(skipping.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    assert trainer.global_step == 8  # a skipped batch still counts as a step, as in Lightning


def _returning(value_fn):
    class M(TrainModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return value_fn(self, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return M()


BAD_OUTPUTS = [
    ("string", lambda m, b: "loss", TypeError, ["returned str", "return a loss tensor", "None to skip"]),
    ("int", lambda m, b: 3, TypeError, ["returned int", "loss tensor"]),
    ("float", lambda m, b: 0.5, TypeError, ["returned float"]),
    ("list", lambda m, b: [m.layer(b[0]).mean()], TypeError, ["returned list"]),
    ("dict without loss", lambda m, b: {"los": m.layer(b[0]).mean()}, ValueError,
     ["without a 'loss' key", "keys: ['los']", '{"loss": loss, ...}']),
    ("dict loss not tensor", lambda m, b: {"loss": 1.0}, TypeError, ["loss=1.0", "must be a tensor"]),
    ("non-scalar", lambda m, b: m.layer(b[0]), ValueError, ["shape (4, 1)", "loss.mean()"]),
    ("no grad", lambda m, b: m.layer(b[0]).mean().detach(), ValueError, ["does not require grad", "detached"]),
    ("constant", lambda m, b: torch.tensor(1.0), ValueError, ["does not require grad"]),
]


@pytest.mark.parametrize(("value_fn", "error", "words"), [b[1:] for b in BAD_OUTPUTS], ids=[b[0] for b in BAD_OUTPUTS])
def test_training_step_returning_a_non_loss_is_refused(make_trainer, make_loader, value_fn, error, words):
    with pytest.raises(error) as info:
        make_trainer().fit(_returning(value_fn), make_loader())
    message = str(info.value)
    assert "training_step" in message
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


# ---- manual optimization ------------------------------------------------------------------------------------
class GAN(TrainModule):
    """Two optimizers stepped by hand, GAN-style: discriminator first, then generator."""

    automatic_optimization = False

    def __init__(self):
        super().__init__()
        self.generator = torch.nn.Linear(2, 4)
        self.discriminator = torch.nn.Linear(4, 1)

    def losses(self, x):
        fake = self.generator(torch.ones(len(x), 2))
        d_loss = self.discriminator(fake.detach()).mean() - self.discriminator(x).mean()
        return d_loss, fake

    def training_step(self, batch, batch_idx):
        (x, _) = batch
        opt_g, opt_d = self.optimizers()
        d_loss, fake = self.losses(x)
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        g_loss = -self.discriminator(fake).mean()
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.log("g_loss", g_loss)
        return {"d_loss": d_loss.detach()}

    def configure_optimizers(self):
        opt_g = torch.optim.SGD(self.generator.parameters(), lr=0.1)
        opt_d = torch.optim.SGD(self.discriminator.parameters(), lr=0.05)
        return [opt_g, opt_d]


def raw_gan_loop(module: GAN, loader, epochs: int) -> None:
    opt_g = torch.optim.SGD(module.generator.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(module.discriminator.parameters(), lr=0.05)
    for _ in range(epochs):
        for x, _ in loader:
            d_loss, fake = module.losses(x)
            d_loss.backward()
            opt_d.step()
            opt_d.zero_grad()
            (-module.discriminator(fake).mean()).backward()
            opt_g.step()
            opt_g.zero_grad()


def test_manual_gan_matches_a_raw_loop(make_trainer, make_loader):
    torch.manual_seed(0)
    gan = GAN()
    reference = copy.deepcopy(gan)
    calls = []

    class Count(Callback):
        def on_before_backward(self, trainer, module, loss):
            calls.append("backward")

        def on_before_optimizer_step(self, trainer, module, optimizer):
            calls.append(optimizer)

    loader = make_loader(12, batch_size=4)
    trainer = make_trainer(max_epochs=2, callbacks=[Count()])
    trainer.fit(gan, loader)
    raw_gan_loop(reference, loader, epochs=2)
    for a, b in zip(gan.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    assert trainer.global_step == 12  # every optimizer.step() counts: 2 per batch x 6 batches
    assert calls.count("backward") == 12
    assert calls[1] is trainer.optimizers[1] and calls[3] is trainer.optimizers[0]
    assert "g_loss" in trainer.callback_metrics


def test_manual_max_steps_counts_every_optimizer_step(make_trainer, make_loader):
    trainer = make_trainer(max_epochs=None, max_steps=4)
    trainer.fit(GAN(), make_loader(40, batch_size=4))
    assert trainer.global_step == 4 and trainer.current_epoch == 1  # Lightning: the epoch max_steps cut short counts


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_manual_lr_schedulers_are_stepped_by_the_user_only(make_trainer, make_loader, interval):
    class M(GAN):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            if interval == "step":
                for scheduler in self.lr_schedulers():
                    scheduler.step()
            return out

        def on_train_epoch_end(self):
            if interval == "epoch":
                for scheduler in self.lr_schedulers():
                    scheduler.step()

        def configure_optimizers(self):
            opts = super().configure_optimizers()
            scheds = [{"scheduler": torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5), "interval": interval}
                      for o in opts]
            return opts, scheds

    trainer = make_trainer(max_epochs=2)
    trainer.fit(M(), make_loader(12, batch_size=4))  # 3 batches per epoch
    steps = 6 if interval == "step" else 2
    assert [o.param_groups[0]["lr"] for o in trainer.optimizers] == pytest.approx([0.1 * 0.5**steps,
                                                                                  0.05 * 0.5**steps])


def test_optimizers_and_lr_schedulers_single_and_absent(make_trainer, tiny_module_cls, make_loader):
    seen = {}

    class M(tiny_module_cls):
        automatic_optimization = False

        def training_step(self, batch, batch_idx):
            seen["opt"], seen["sched"] = self.optimizers(), self.lr_schedulers()
            opt = self.optimizers()
            self.manual_backward(self.loss(batch))
            opt.step()
            opt.zero_grad()

    trainer = make_trainer()
    trainer.fit(M(), make_loader())
    assert seen["opt"].optimizer is trainer.optimizers[0] and seen["sched"] is None
    assert seen["opt"].param_groups is trainer.optimizers[0].param_groups  # attribute access passes through
    assert trainer.global_step == 5
