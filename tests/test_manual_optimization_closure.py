"""``optimizer.step(closure=..., **kwargs)`` as in Lightning: under manual optimization the closure reaches
``torch.optim.Optimizer.step`` (LBFGS re-evaluates it; ``on_before_optimizer_step`` sees each evaluation's
gradients), and keyword arguments reach the optimizer's ``step`` in manual and automatic optimization."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from framework import TrainModule


def regression_data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return TensorDataset(x, x @ torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64) + 0.25)


class RecordingSGD(torch.optim.SGD):
    """SGD whose step records the keyword arguments it was given (Lightning users pass their own)."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.calls: list[dict[str, Any]] = []

    def step(self, closure: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        self.calls.append({"closure": closure is not None, **kwargs})
        return super().step(closure)


class LBFGSModule(TrainModule):
    """Manual optimization with LBFGS: the closure does forward and backward; LBFGS calls it several times."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1).double()
        self.evaluations = 0
        self.hook_grads: list[torch.Tensor] = []
        self.returned: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch

        def closure() -> torch.Tensor:
            self.evaluations += 1
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.manual_backward(loss)
            return loss

        self.returned.append(opt.step(closure=closure))

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.hook_grads.append(self.layer.weight.grad.clone())

    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)


def test_lbfgs_closure_is_re_evaluated_like_a_raw_torch_loop(make_trainer):
    module = LBFGSModule()
    reference = copy.deepcopy(module.layer)
    loader = DataLoader(regression_data(), batch_size=8)
    trainer = make_trainer(precision="64-true")
    trainer.fit(module, loader)

    raw = torch.optim.LBFGS(reference.parameters(), lr=0.5, max_iter=5)
    evaluations = 0
    for x, y in loader:
        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            nonlocal evaluations
            evaluations += 1
            raw.zero_grad()
            loss = torch.nn.functional.mse_loss(reference(x), y)
            loss.backward()
            return loss

        raw.step(closure)
    assert module.evaluations == evaluations > 2 * len(loader)  # LBFGS evaluated the closure several times
    assert len(module.hook_grads) == module.evaluations  # the hook ran after each evaluation, on its gradients
    for ours, theirs in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert trainer.global_step == len(loader)  # one optimizer step per opt.step() call
    assert all(isinstance(loss, torch.Tensor) for loss in module.returned)  # step returns the closure's loss


class KwargsManual(TrainModule):
    def __init__(self, with_closure: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(3, 1).double()
        self.with_closure = with_closure
        self.closure_runs = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)

        def closure() -> torch.Tensor:
            self.closure_runs += 1
            self.manual_backward(loss)
            return loss

        if self.with_closure:
            assert opt.step(closure=closure, tag=batch_idx) is loss
        else:
            closure()
            assert opt.step(tag=batch_idx) is None
        opt.zero_grad()

    def configure_optimizers(self) -> Any:
        return RecordingSGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("precision", ["64-true", "16-mixed"])
@pytest.mark.parametrize("with_closure", [True, False])
def test_manual_step_keyword_arguments_reach_the_optimizer(make_trainer, precision, with_closure):
    module = KwargsManual(with_closure)
    if precision == "16-mixed":
        module.layer.float()
        data = TensorDataset(*(0.01 * t.float() for t in regression_data().tensors))  # no fp16 overflow at 2**16
    else:
        data = regression_data()
    trainer = make_trainer(precision=precision)
    trainer.fit(module, DataLoader(data, batch_size=8))
    optimizer = trainer.optimizers[0]
    # GradScaler cannot step with a closure: it runs once first, then the step gets the keyword arguments only.
    passed_closure = with_closure and precision != "16-mixed"
    assert optimizer.calls == [{"closure": passed_closure, "tag": 0}, {"closure": passed_closure, "tag": 1}]
    assert module.closure_runs == 2 and trainer.global_step == 2 and trainer.skipped_steps == 0


def test_optimizer_step_override_passes_keyword_arguments(make_trainer):
    class Automatic(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1).double()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
            optimizer.step(closure=optimizer_closure, tag=f"batch {batch_idx}")

        def configure_optimizers(self) -> Any:
            return RecordingSGD(self.parameters(), lr=0.1)

    trainer = make_trainer(precision="64-true")
    trainer.fit(Automatic(), DataLoader(regression_data(), batch_size=8))
    assert [call["tag"] for call in trainer.optimizers[0].calls] == ["batch 0", "batch 1"]


def test_deepspeed_refuses_step_keyword_arguments_naming_the_way_out():
    from strategies.deepspeed import DeepSpeedPrecision

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"\['tag'\].*engine.step\(\).*strategy='ddp'"):
        DeepSpeedPrecision("32-true").optimizer_step(optimizer, tag=1)


def test_lbfgs_under_automatic_optimization_is_refused_naming_manual_optimization(make_trainer):
    class Automatic(LBFGSModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = True

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

    with pytest.raises(ValueError, match=r"LBFGS.*self.automatic_optimization = False.*step\(closure=...\)"):
        make_trainer(precision="64-true").fit(Automatic(), DataLoader(regression_data(), batch_size=8))


def test_toggle_model_toggles_the_optimizers_parameters_for_the_block(make_trainer):
    """Lightning's optimizer.toggle_model(): inside, only this optimizer's parameters require grad; after, every
    flag is back (on one process sync_grad has nothing to skip)."""

    class TwoOptimizers(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.a, self.b = torch.nn.Linear(3, 1).double(), torch.nn.Linear(3, 1).double()
            self.seen: list[tuple[bool, bool]] = []

        def training_step(self, batch: Any, batch_idx: int) -> None:
            first, second = self.optimizers()
            x, y = batch
            with first.toggle_model(sync_grad=False):
                self.seen.append((self.a.weight.requires_grad, self.b.weight.requires_grad))
                self.manual_backward(torch.nn.functional.mse_loss(self.a(x) + self.b(x), y))
            assert self.b.weight.grad is None and self.a.weight.grad is not None
            first.step()
            first.zero_grad()
            self.seen.append((self.a.weight.requires_grad, self.b.weight.requires_grad))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)

    module = TwoOptimizers()
    make_trainer(precision="64-true").fit(module, DataLoader(regression_data(), batch_size=8))
    assert module.seen == [(True, False), (True, True)] * 2
