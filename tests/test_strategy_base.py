"""Strategy base: the shared preparation runs once for every strategy, then its one wrap hook; the
strategies package imports first in a fresh interpreter; one decision reduction and one gradient scaling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from framework.precision import resolve_precision
from strategies import Strategy
from strategies.parallel import ParallelStrategy

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("statement", [
    "from strategies import DDPStrategy",  # the reported cycle: strategies -> framework -> trainer -> strategies
    "from strategies import FSDPStrategy, DeepSpeedStrategy, XLAStrategy, Strategy",
    "import strategies.registry",
    "import strategies.parallel",
    "from strategies.deepspeed_checkpoint import SafeCheckpointEngine",
])
def test_strategies_import_first_in_a_fresh_interpreter(statement: str) -> None:
    done = subprocess.run([sys.executable, "-c", statement], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


class Recording(Strategy):
    """Overrides only the wrap hook, as a third-party strategy would."""

    name = "recording"

    def wrap_module(self, module: nn.Module) -> nn.Module:
        self.arrived_dtype = next(module.parameters()).dtype
        return nn.Sequential(module)


def test_setup_module_prepares_once_then_calls_the_wrap_hook() -> None:
    strategy = Recording()
    strategy.connect_precision(resolve_precision("64-true"))
    module = nn.Linear(2, 2)
    strategy.setup_module(module)
    assert strategy.arrived_dtype == torch.float64  # converted before the hook
    assert strategy.module is module and isinstance(strategy.model, nn.Sequential)

    dispatched = nn.Linear(2, 2)
    dispatched.hf_device_map = {"a": 0, "b": 1}
    with pytest.raises(ValueError, match="already dispatched across several devices"):
        Recording().setup_module(dispatched)


def test_a_parallel_strategy_without_a_wrap_hook_is_refused() -> None:
    class NoWrap(ParallelStrategy):
        name = "nowrap"

    with pytest.raises(TypeError, match=r"NoWrap must define wrap_module\(module\)"):
        NoWrap(accelerator="cpu").wrap_module(nn.Linear(1, 1))


def test_single_process_decision_and_gradient_scaling() -> None:
    strategy = Strategy()
    assert strategy.reduce_boolean_decision(1) is True and strategy.reduce_boolean_decision(0, all=False) is False
    net = nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.grad.clone() for p in net.parameters()]
    strategy.scale_gradients([optimizer], 0.5)
    for p, grad in zip(net.parameters(), before):
        torch.testing.assert_close(p.grad, grad * 0.5, rtol=0, atol=0)
