"""TrainModule utilities: optimizers()/lr_schedulers() shapes, toggling, manual_backward, ranks, loggers,
print, all_gather, freeze, export and the step-signature helpers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from framework import Trainer, TrainModule
from framework.module_utils import step_takes_batch_idx, step_takes_dataloader_idx


def loader(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g)), batch_size=4)


def fit(module: TrainModule, tmp_path: Any, **kwargs: Any) -> Trainer:
    trainer = Trainer(max_steps=kwargs.pop("max_steps", 1), logger=kwargs.pop("logger", False),
                      enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path), **kwargs)
    trainer.fit(module, loader())
    return trainer


class TwoOptimizers(TrainModule):
    """A GAN-shaped manual step: each optimizer toggled in turn; records what the utilities return."""

    def __init__(self, schedulers: int = 0) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g = torch.nn.Linear(4, 4)
        self.d = torch.nn.Linear(4, 1)
        self.schedulers = schedulers
        self.seen: dict[str, Any] = {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        self.seen["plain"] = self.optimizers(use_pl_optimizer=False)
        self.seen["schedulers"] = self.lr_schedulers()
        self.toggle_optimizer(opt_g)
        self.seen["while_g"] = (all(p.requires_grad for p in self.g.parameters()),
                                any(p.requires_grad for p in self.d.parameters()))
        loss = self.d(self.g(x)).mean()
        opt_g.zero_grad()
        if self.seen.get("args"):  # retain_graph reaches Tensor.backward: a second backward through the graph works
            self.manual_backward(loss, retain_graph=True)
        self.manual_backward(loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.seen["d_grad_after_g"] = self.d.weight.grad
        with self.toggled_optimizer(opt_d):
            d_loss = self.d(self.g(x).detach()).mean()
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
        self.seen["after"] = all(p.requires_grad for p in self.parameters())

    def configure_optimizers(self) -> Any:
        opts = [torch.optim.SGD(self.g.parameters(), lr=0.1), torch.optim.SGD(self.d.parameters(), lr=0.1)]
        scheds = [torch.optim.lr_scheduler.StepLR(o, 1) for o in opts[:self.schedulers]]
        return (opts, scheds) if scheds else opts


def test_manual_two_optimizer_step_with_toggling(tmp_path):
    module = TwoOptimizers()
    trainer = fit(module, tmp_path)
    seen = module.seen
    assert seen["while_g"] == (True, False)
    assert seen["d_grad_after_g"] is None  # the generator's backward left no gradient on the discriminator
    assert seen["after"] is True
    assert seen["plain"] == trainer.optimizers and isinstance(seen["plain"], list)
    assert seen["schedulers"] is None
    assert trainer.global_step == 2  # both optimizer steps count, as in Lightning


@pytest.mark.parametrize("count", [1, 2])
def test_lr_schedulers_single_object_or_list(tmp_path, count):
    module = TwoOptimizers(schedulers=count)
    fit(module, tmp_path)
    scheds = module.seen["schedulers"]
    if count == 1:
        assert isinstance(scheds, torch.optim.lr_scheduler.StepLR)
    else:
        assert isinstance(scheds, list) and len(scheds) == 2


def test_single_optimizer_is_returned_bare(tmp_path):
    class One(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            assert not isinstance(opt, list) and opt.optimizer is self.optimizers(use_pl_optimizer=False)
            opt.zero_grad()
            self.manual_backward(self.layer(batch[0]).mean())
            opt.step()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    assert fit(One(), tmp_path).global_step == 1


def test_manual_backward_refuses_in_automatic_optimization_and_unsupported_args(tmp_path):
    class Auto(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.manual_backward(self.layer(batch[0]).mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        fit(Auto(), tmp_path)
    module = TwoOptimizers()
    module.seen["args"] = True
    fit(module, tmp_path)  # manual_backward(loss, retain_graph=True) is passed on through the strategy


def test_attributes_without_a_trainer_have_lightnings_values():
    module = TrainModule()
    assert (module.global_rank, module.local_rank, module.logger, module.loggers) == (0, 0, None, [])
    assert module.fabric is None and module.on_gpu is False and module.dtype == torch.float32
    assert module.example_input_array is None and module.strict_loading is True
    module.example_input_array = torch.zeros(1)
    assert module.example_input_array.shape == (1,)
    with pytest.raises(RuntimeError, match="not attached to a Trainer"):
        module.trainer  # noqa: B018
    with pytest.raises(RuntimeError, match="not attached"):
        module.all_gather(torch.ones(1))


def test_trainer_setter_reaches_nested_modules():
    outer = TrainModule()
    outer.inner = TrainModule()
    sentinel = object()
    outer.trainer = sentinel
    assert outer.trainer is sentinel and outer.inner.trainer is sentinel


def test_dtype_follows_the_parameters():
    module = TrainModule()
    module.layer = torch.nn.Linear(1, 1)
    assert module.double().dtype == torch.float64


def test_attached_attributes_loggers_print_all_gather(tmp_path, capsys):
    class Probe(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.seen: dict[str, Any] = {}

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.seen.update(ranks=(self.global_rank, self.local_rank), loggers=self.loggers,
                             logger=self.logger, gathered=self.all_gather({"a": torch.ones(2), "n": 3}))
            self.print("hello from rank", self.global_rank)
            return self.layer(batch[0]).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Probe()
    trainer = fit(module, tmp_path, logger=True)
    seen = module.seen
    assert seen["ranks"] == (0, 0)
    assert seen["loggers"] == trainer.loggers and seen["logger"] is trainer.logger is not None
    assert torch.equal(seen["gathered"]["a"], torch.ones(2)) and seen["gathered"]["n"].item() == 3
    assert "hello from rank 0" in capsys.readouterr().out


def test_freeze_and_unfreeze():
    module = TrainModule()
    module.layer = torch.nn.Linear(2, 2)
    module.freeze()
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    module.unfreeze()
    assert module.training and all(p.requires_grad for p in module.parameters())


class Exportable(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.example_input_array = torch.randn(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layer(x))


@pytest.mark.parametrize("method", ["script", "trace"])
def test_to_torchscript_saves_a_loadable_equivalent(tmp_path, method):
    module = Exportable()
    scripted = module.to_torchscript(tmp_path / "m.pt", method=method)
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(4, 3)
    assert torch.allclose(loaded(x), module(x)) and torch.allclose(scripted(x), module(x))
    assert module.training  # the mode is restored


def test_to_torchscript_and_to_onnx_refusals():
    module = Exportable()
    module.example_input_array = None
    with pytest.raises(ValueError, match="example_inputs"):
        module.to_torchscript(method="trace")
    with pytest.raises(ValueError, match="'script' or 'trace'"):
        module.to_torchscript(method="compile")
    try:
        import onnx  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="pip install onnx"):
            module.to_onnx("m.onnx")
    else:
        with pytest.raises(ValueError, match="input_sample"):
            module.to_onnx("m.onnx")


# ---- step signatures --------------------------------------------------------------------------------------

class Steps:
    def batch_only(self, batch): ...
    def with_idx(self, batch, batch_idx): ...
    def renamed(self, batch, i): ...
    def star(self, *args): ...
    def three(self, batch, batch_idx, dataloader_idx=0): ...
    def named_kw(self, batch, *, batch_idx=0): ...


@pytest.mark.parametrize("name, takes_idx, takes_dl", [
    ("batch_only", False, False), ("with_idx", True, False), ("renamed", True, False), ("star", True, True),
    ("three", True, True), ("named_kw", False, False)])
def test_step_signature_helpers_follow_lightnings_rule(name, takes_idx, takes_dl):
    bound = getattr(Steps(), name)
    assert step_takes_batch_idx(bound) is takes_idx
    assert step_takes_dataloader_idx(bound) is takes_dl
    assert step_takes_batch_idx(getattr(Steps, name)) is takes_idx  # the plain function too


# ---- two real gloo processes -------------------------------------------------------------------------------

class _GatherProbe(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from framework import rank_zero_only

        rank = self.global_rank
        plain = self.all_gather({"r": torch.tensor([float(rank)]), "n": rank + 10})
        out = self.layer(batch[0]).mean()
        gathered = self.all_gather(out.reshape(1), sync_grads=True)  # differentiable: every rank's output
        self.print(f"print-from-rank-{rank}")
        ran = rank_zero_only(lambda: True, default=False)()
        print(f"RESULT rank={rank} r={plain['r'].flatten().tolist()} n={plain['n'].tolist()} "
              f"grad={gathered.requires_grad} shape={tuple(gathered.shape)} rank_zero_ran={ran}", flush=True)
        return gathered.sum()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _gather_job() -> None:
    trainer = Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(_GatherProbe(), loader(16))


def test_all_gather_print_and_rank_zero_only_on_two_gloo_ranks():
    from framework.testing import run_distributed

    results = run_distributed(_gather_job, nproc=2, timeout=240, stream=False)
    lines = [next(line for line in r.stdout.splitlines() if line.startswith("RESULT")) for r in results]
    assert lines == [f"RESULT rank={rank} r=[0.0, 1.0] n=[10, 11] grad=True shape=(2, 1) rank_zero_ran={rank == 0}"
                     for rank in range(2)]
    assert "print-from-rank-0" in results[0].stdout
    assert "print-from-rank-1" not in results[1].stdout


# ---- toggling as a property ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(flags=st.lists(st.booleans(), min_size=4, max_size=4),
       groups=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True), min_size=2, max_size=3),
       target=st.integers(0, 2))
def test_toggle_then_untoggle_restores_every_flag(flags, groups, target):
    target %= len(groups)
    params = [torch.nn.Parameter(torch.zeros(1), requires_grad=f) for f in flags]
    optimizers = [torch.optim.SGD([params[i] for i in group], lr=0.1) for group in groups]
    module = TrainModule()
    module.trainer = SimpleNamespace(optimizers=optimizers)  # only the optimizer list is read
    module.toggle_optimizer(optimizers[target])
    for i, param in enumerate(params):
        in_target, in_any = i in groups[target], any(i in g for g in groups)
        assert param.requires_grad == (flags[i] if in_target or not in_any else False)
    module.untoggle_optimizer(optimizers[target])
    assert [p.requires_grad for p in params] == flags
