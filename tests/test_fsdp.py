"""FSDPStrategy (FSDP2): real two-process gloo jobs (tests/distributed/fsdp_jobs.py) and argument checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch import nn

from framework.testing import require_distributed, run_distributed
from strategies import FSDPStrategy

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import fsdp_jobs  # noqa: E402
from dist_common import Regression  # noqa: E402

pytestmark = pytest.mark.distributed


@require_distributed
def test_equivalence_clipping_accumulation_and_uneven_evaluation():
    run_distributed(fsdp_jobs.equivalence_job, nproc=2, timeout=120)


@require_distributed
def test_tied_weights_precision_and_memory_per_rank_about_half_of_ddp(tmp_path):
    out = tmp_path / "numel.txt"
    run_distributed(fsdp_jobs.tied_precision_memory_job, nproc=2, timeout=120, args=(str(out),))
    fsdp, ddp, ratio = out.read_text().split()
    assert float(ratio) <= 0.55 and int(fsdp) < int(ddp)


def test_refuses_a_model_dispatched_with_a_device_map():
    module = Regression()
    module.hf_device_map = {"net.0": "cpu", "net.2": "disk"}
    with pytest.raises(ValueError, match="device_map"):
        FSDPStrategy().setup_module(module)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(state_dict_type="local"), ValueError, "state_dict_type"),
    (dict(auto_wrap_policy=42), TypeError, "auto_wrap_policy"),
    (dict(auto_wrap_policy={int}), TypeError, "auto_wrap_policy"),
    (dict(auto_wrap_policy={nn.Linear}, parallelize_fn=lambda m, mesh: None), ValueError, "parallelize_fn"),
])
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FSDPStrategy(**kwargs)


def test_wrap_targets_skip_tied_modules_and_order_children_first():
    from strategies.fsdp import _policy_matcher, _wrap_targets

    tied = fsdp_jobs.Tied()
    with pytest.warns(UserWarning, match="shared with modules outside"):
        targets = _wrap_targets(tied, _policy_matcher({nn.Embedding, nn.Linear}))
    assert tied.embed not in targets and tied.head not in targets and tied.net[0] in targets
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    targets = _wrap_targets(nested, lambda m: isinstance(m, (nn.Sequential, nn.Linear)))
    assert targets.index(nested[0][0]) < targets.index(nested[0])
