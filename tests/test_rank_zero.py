"""rank_zero_only and rank_zero_info/warn/debug: run on rank 0 only; the rank comes from the environment."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from framework import rank_zero_debug, rank_zero_info, rank_zero_only, rank_zero_warn
from framework.rank_zero import sync_rank


@pytest.fixture
def rank():
    saved = rank_zero_only.rank
    yield lambda r: sync_rank(r)
    rank_zero_only.rank = saved


def test_decorated_function_runs_on_rank_zero_only(rank):
    calls = []

    @rank_zero_only
    def record(x):
        calls.append(x)
        return x

    assert record(1) == 1
    rank(1)
    assert record(2) is None and calls == [1]
    assert rank_zero_only(lambda: "ran", default="skipped")() == "skipped"
    assert record.__name__ == "record"


def test_unset_rank_is_a_clear_error(rank):
    rank_zero_only.rank = None
    with pytest.raises(RuntimeError, match="rank_zero_only.rank is not set"):
        rank_zero_only(lambda: None)()


def test_info_warn_debug_only_on_rank_zero(rank, caplog):
    caplog.set_level(logging.DEBUG, logger="framework")
    with pytest.warns(UserWarning, match="careful"):
        rank_zero_warn("careful")
    rank_zero_info("hello %s", "info")
    rank_zero_debug("hello debug")
    assert [r.getMessage() for r in caplog.records] == ["hello info", "hello debug"]
    rank(3)
    caplog.clear()
    rank_zero_info("hidden")
    rank_zero_warn("hidden")  # no warning raised on rank 3 (pytest's -W error would fail otherwise)
    assert caplog.records == []


@pytest.mark.parametrize("env, expected", [({"RANK": "2"}, 2), ({"SLURM_PROCID": "1"}, 1),
                                           ({"LOCAL_RANK": "3"}, 3), ({}, 0)])
def test_rank_is_read_from_the_launcher_environment(env, expected):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK")}
    code = "from framework import rank_zero_only; print(rank_zero_only.rank)"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert int(out.strip()) == expected
