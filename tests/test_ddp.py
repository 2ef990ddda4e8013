"""DDPStrategy: real two-process gloo jobs (tests/distributed/ddp_jobs.py) and in-process refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from framework.testing import require_distributed, run_distributed
from strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import ddp_jobs  # noqa: E402
from dist_common import Regression  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("job", [ddp_jobs.equivalence_job, ddp_jobs.uneven_job], ids=lambda job: job.__name__)
@require_distributed
def test_two_rank_job(job):
    run_distributed(job, nproc=2, timeout=120)


def test_refuses_a_model_dispatched_with_a_device_map():
    module = Regression()
    module.hf_device_map = {"net.0": 0, "net.2": 1}
    with pytest.raises(ValueError, match="device_map"):
        DDPStrategy().setup_module(module)


@pytest.mark.parametrize("kwargs, error", [
    (dict(accelerator="mps"), ValueError), (dict(timeout=30), TypeError)])
def test_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        DDPStrategy(**kwargs)


def test_registry_builds_ddp_with_options():
    from strategies import resolve_strategy

    strategy = resolve_strategy("ddp", accelerator="cpu", devices=2)
    assert isinstance(strategy, DDPStrategy) and strategy.world_size == 2 and strategy.backend == "gloo"
    assert strategy.root_device == torch.device("cpu")
