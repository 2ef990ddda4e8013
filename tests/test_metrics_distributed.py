"""sync_dist on two real gloo ranks: epoch means weighted across ranks, sum/max/min, groups, rank_zero_only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from framework.testing import require_distributed, run_distributed

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import metrics_jobs  # noqa: E402

pytestmark = pytest.mark.distributed


@require_distributed
def test_sync_dist_epoch_values_over_uneven_ranks():
    run_distributed(metrics_jobs.sync_job, nproc=2, timeout=180)
