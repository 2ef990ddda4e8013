"""StochasticWeightAveraging: the averaged weights, SWALR, batch-norm refresh, refusals, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyModule
from torch import nn
from torch.optim.swa_utils import SWALR, update_bn

from callbacks.lambda_function import LambdaCallback
from callbacks.stochastic_weight_avg import StochasticWeightAveraging


class Scheduled(TinyModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def snapshots_at_epoch_start(store):
    return LambdaCallback(on_train_epoch_start=lambda trainer, module: store.append(
        [p.detach().clone() for p in module.parameters()]))


def test_final_weights_are_the_average(make_trainer, make_loader):
    seen = []
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1,
                                    annealing_strategy="linear")
    trainer = make_trainer(max_epochs=5, callbacks=[snapshots_at_epoch_start(seen), swa])
    module = TinyModule()
    trainer.fit(module, make_loader(num_samples=16))
    # Lightning's schedule: updates at the start of epochs swa_start (1, 0-based) .. the last (4).
    expected = [torch.stack(ps).mean(0) for ps in zip(*seen[1:5])]
    for param, average in zip(module.parameters(), expected):
        torch.testing.assert_close(param.detach(), average)
    assert int(swa.n_averaged) == 4
    assert isinstance(swa._swa_scheduler, SWALR) and trainer.lr_scheduler_configs == []  # stepped by the callback
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)


def test_float_start_replaces_the_users_scheduler(make_trainer, make_loader):
    swa = StochasticWeightAveraging(swa_lrs=[0.02], swa_epoch_start=0.5)
    trainer = make_trainer(max_epochs=4, callbacks=[swa])
    trainer.fit(Scheduled(), make_loader())
    assert swa.swa_start == 1 and int(swa.n_averaged) == 3
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, SWALR)


class WithBatchNorm(TinyModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))


def test_batch_norm_statistics_match_the_averaged_weights(make_trainer, make_loader):
    module = WithBatchNorm()
    loader = make_loader(num_samples=16)
    make_trainer(max_epochs=3, callbacks=[StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)]).fit(
        module, loader)
    bn = module.layer[1]
    fresh = WithBatchNorm()
    fresh.load_state_dict(module.state_dict())
    update_bn(loader, fresh)
    torch.testing.assert_close(bn.running_mean, fresh.layer[1].running_mean)
    torch.testing.assert_close(bn.running_var, fresh.layer[1].running_var)
    assert bn.momentum == 0.1 and module.training


def test_refusals(make_trainer, make_loader):
    with pytest.raises(ValueError, match="swa_lrs"):
        StochasticWeightAveraging(swa_lrs=-1.0)
    with pytest.raises(ValueError, match="swa_epoch_start"):
        StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=0)
    with pytest.raises(ValueError, match="annealing_strategy"):
        StochasticWeightAveraging(swa_lrs=0.1, annealing_strategy="step")

    class TwoOptimizers(TinyModule):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.layer.parameters(), lr=0.1), torch.optim.SGD([self.extra], lr=0.1)]

        def __init__(self):
            super().__init__()
            self.extra = nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.extra.sum()

    with pytest.raises(ValueError, match="one optimizer"):
        make_trainer(callbacks=[StochasticWeightAveraging(swa_lrs=0.1)]).fit(TwoOptimizers(), make_loader())

    class NoForward(WithBatchNorm):
        forward = nn.Module.forward

        def loss(self, batch):
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    with pytest.raises(ValueError, match="define forward"):
        make_trainer(callbacks=[StochasticWeightAveraging(swa_lrs=0.1)]).fit(NoForward(), make_loader())


@pytest.mark.parametrize("module_cls", [TinyModule, Scheduled])
def test_resume_mid_average_matches_an_uninterrupted_run(make_trainer, make_loader, tmp_path, module_cls):
    def run(max_epochs, callbacks, ckpt_path=None):
        torch.manual_seed(0)
        module = module_cls()
        make_trainer(max_epochs=max_epochs, callbacks=callbacks).fit(module, make_loader(num_samples=16),
                                                                     ckpt_path=ckpt_path)
        return module

    def swa():
        return StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=2)

    straight = run(5, [swa()])
    path = str(tmp_path / "epoch2")
    saver = LambdaCallback(on_train_epoch_end=lambda trainer, module: trainer.current_epoch == 2
                           and trainer.save_checkpoint(path))
    run(5, [swa(), saver])
    resumed_swa = swa()
    resumed = run(5, [resumed_swa], ckpt_path=path)
    assert int(resumed_swa.n_averaged) == 4
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
