"""DDP resume is bit-exact at 3 and 4 ranks (issue #19): the resumed wrapper reduces with the saved run's
bucket layout (strategies/ddp_buckets.py). Real gloo jobs; the model and settings are the issue's table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from framework.testing import require_distributed, run_distributed

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import resume_jobs  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@require_distributed
def test_three_ranks_resume_bit_exact_with_every_ddp_variant(tmp_path):
    # (the table's bucket_cap_mb=1000 is the default layout for a model this small; 0.02 MB makes several buckets)
    cases = [({}, 3), ({"bucket_cap_mb": 0.02}, 1), ({"static_graph": True}, 3), ({"find_unused_parameters": True}, 1)]
    run_distributed(resume_jobs.resume_job, nproc=3, timeout=600, args=(str(tmp_path), cases, True))


@require_distributed
def test_four_ranks_resume_bit_exact(tmp_path):
    run_distributed(resume_jobs.resume_job, nproc=4, timeout=600, args=(str(tmp_path), [({}, 3)], False))
