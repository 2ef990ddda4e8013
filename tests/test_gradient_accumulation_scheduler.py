"""GradientAccumulationScheduler: Lightning's schedule on Kiln's exact accumulation windows."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyModule

from callbacks.accumulation import GradientAccumulation
from callbacks.gradient_accumulation_scheduler import GradientAccumulationScheduler


def test_schedule_and_lightning_helpers():
    scheduler = GradientAccumulationScheduler({4: 3, 2: 2})
    assert isinstance(scheduler, GradientAccumulation)
    assert scheduler.scheduling == {0: 1, 2: 2, 4: 3} and scheduler.epochs == [0, 2, 4]
    assert [scheduler.get_accumulate_grad_batches(e) for e in range(6)] == [1, 1, 2, 2, 3, 3]
    assert scheduler.going_to_accumulate_grad_batches()
    assert not GradientAccumulationScheduler({0: 1}).going_to_accumulate_grad_batches()


@pytest.mark.parametrize(("scheduling", "error"), [({}, TypeError), ([1], TypeError), ({-1: 2}, IndexError),
                                                   ({1: 0}, IndexError), ({"1": 2}, IndexError),
                                                   ({1: 2.5}, IndexError)])
def test_bad_schedules(scheduling, error):
    with pytest.raises(error):
        GradientAccumulationScheduler(scheduling)


def test_steps_follow_the_schedule(make_trainer, make_loader):
    trainer = make_trainer(max_epochs=3, callbacks=[GradientAccumulationScheduler({1: 2, 2: 4})])
    trainer.fit(TinyModule(), make_loader(num_samples=32, batch_size=4))  # 8 batches per epoch
    assert trainer.global_step == 8 + 4 + 2


def test_equals_one_big_batch(make_trainer, make_loader):
    """Epoch 1 with k=2 over batches of 4 takes the same steps as batches of 8 (Kiln's exact mean)."""
    torch.manual_seed(0)
    accumulated, reference = TinyModule(), TinyModule()
    reference.load_state_dict(accumulated.state_dict())
    make_trainer(max_epochs=2, callbacks=[GradientAccumulationScheduler({1: 2})]).fit(
        accumulated, make_loader(num_samples=24, batch_size=4))
    first = make_trainer(max_epochs=1)
    first.fit(reference, make_loader(num_samples=24, batch_size=4))
    make_trainer(max_epochs=1).fit(reference, make_loader(num_samples=24, batch_size=8))
    for a, b in zip(accumulated.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_refuses_trainer_argument_and_manual_optimization(make_trainer, make_loader):
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        make_trainer(accumulate_grad_batches=2, callbacks=[GradientAccumulationScheduler({1: 2})])

    class Manual(TinyModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            opt.step()

    with pytest.raises(RuntimeError, match="manual optimization"):
        make_trainer(callbacks=[GradientAccumulationScheduler({0: 2})]).fit(Manual(), make_loader())
