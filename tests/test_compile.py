"""Trainer(compile=...) in one process: compiled == eager, clean checkpoint keys both ways, a module
compiled by the user, the recompile warning, refusals, and the one inductor test.

Most tests use backend="aot_eager" (traces and runs the AOT graphs without codegen: seconds, not the
~20 s an inductor compile takes on 2 cores). Compiled DDP and model-parallel runs are in the 4-rank job
of tests/test_model_parallel.py.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from framework import Trainer, TrainModule
from framework.compile import RECOMPILE_WARN_AFTER, CompileSetup, compile_options

AOT = {"backend": "aot_eager"}


class Block(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.w1, self.w2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(nn.functional.gelu(self.w1(self.norm(x))))


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data(n: int = 24, batch_size: int = 4, **kwargs: Any) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g)),
                      batch_size=batch_size, **kwargs)


def fit(module: nn.Module, compile: Any = None, loader: DataLoader | None = None, **kwargs: Any) -> Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer = Trainer(**{**defaults, **kwargs}, compile=compile)
    trainer.fit(module, loader if loader is not None else data())
    return trainer


def _compiled(fn: Any) -> bool:
    return hasattr(fn, "_torchdynamo_orig_callable")


def test_compiled_equals_eager_and_checkpoint_keys_stay_clean(tmp_path):
    eager = Net()
    fit(eager)
    compiled = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a run with stable shapes: no recompile warning
        trainer = fit(compiled, compile=AOT)
    assert _compiled(compiled.forward) and not any(_compiled(b.forward) for b in compiled.blocks)
    other = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for n in range(1, 8):  # another function recompiling is not this run's recompilation
            other(torch.ones(n))
    assert trainer._compile.recompiles == 0
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, atol=1e-5, rtol=1e-5)

    # the compiled run's checkpoint: no _orig_mod. anywhere, loads into a plain module and resumes compiled
    from framework.checkpoint.consolidate import load_weights, read_model_state

    trainer.save_checkpoint(str(tmp_path / "compiled"))
    assert not any("_orig_mod" in k for k in read_model_state(str(tmp_path / "compiled")))
    plain = Net()
    load_weights(str(tmp_path / "compiled"), plain)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in compiled.state_dict().items())

    uncompiled = Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    uncompiled.fit(Net(), data(), ckpt_path=str(tmp_path / "compiled"))  # compiled → uncompiled
    uncompiled.save_checkpoint(str(tmp_path / "eager"))
    back = Net()
    resumed = Trainer(max_steps=uncompiled.global_step, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, compile=AOT)
    resumed.fit(back, data(), ckpt_path=str(tmp_path / "eager"))  # uncompiled → compiled (nothing left to run)
    assert _compiled(back.forward) and resumed.global_step == uncompiled.global_step
    assert all(torch.equal(back.state_dict()[k], v) for k, v in uncompiled.module.state_dict().items())


def test_a_module_compiled_by_the_user_is_unwrapped_and_compiled_in_place():
    module = Net()
    trainer = fit(torch.compile(module, backend="aot_eager"))
    assert trainer.module is module and _compiled(module.forward)
    assert not any("_orig_mod" in k for k in trainer.strategy.module_state_dict())
    eager = Net()
    fit(eager)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, atol=1e-5, rtol=1e-5)


class Ragged(Net):
    """Batches of varying length (as a text collate without padding to a fixed size would give)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        n = 1 + batch_idx % 7
        return nn.functional.mse_loss(self(x[:1].expand(n, 8)), y[:1].expand(n, 1))


def test_recompilations_are_counted_and_warn_with_the_cause():
    with pytest.warns(RuntimeWarning, match=r"recompiled.*size mismatch.*drop_last=True.*'dynamic': True"):
        trainer = fit(Ragged(), compile={**AOT, "dynamic": False}, loader=data(n=28))
    assert trainer._compile.recompiles > RECOMPILE_WARN_AFTER


@pytest.mark.parametrize("value, error, match", [
    ("yes", TypeError, "compile='yes'"),
    ({"bogus": 1}, ValueError, "bogus"),
])
def test_bad_compile_arguments(value, error, match):
    with pytest.raises(error, match=match):
        compile_options(value)


@pytest.mark.parametrize("name", ["deepspeed", "xla"])
def test_strategies_that_cannot_compile_refuse_it(name):
    strategy = type("Stub", (), {"name": name})()  # only the name is read before anything is built
    with pytest.raises(ValueError, match=f"strategy='{name}'"):
        CompileSetup(True, strategy)


def test_deepspeed_trainer_refuses_compile():
    with pytest.raises(ValueError, match="compile=.*deepspeed"):
        Trainer(strategy="deepspeed", compile=True, max_steps=1)


def test_inductor_compiled_step_equals_eager():
    """The one inductor test (a real C++ codegen compile: ~20 s on 2 cores)."""
    eager, compiled = Net(), Net()
    fit(eager, max_epochs=None, max_steps=3)
    fit(compiled, compile=True, max_epochs=None, max_steps=3)
    assert _compiled(compiled.forward)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, atol=1e-5, rtol=1e-5)
