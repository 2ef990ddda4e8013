"""seed_everything, derive_seed and the dataloader worker seeding."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from framework.seed import (
    MAX_SEED,
    SEED_ENV,
    WORKERS_ENV,
    SeedingWorkerInit,
    derive_seed,
    global_seed,
    seed_everything,
    seed_workers_enabled,
    worker_init_fn,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(SEED_ENV, raising=False)
    monkeypatch.delenv(WORKERS_ENV, raising=False)


def _draw() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_makes_all_sources_reproducible():
    assert seed_everything(123) == 123
    first = _draw()
    seed_everything(123)
    assert _draw() == first
    seed_everything(124)
    assert _draw() != first


@pytest.mark.parametrize("workers", [True, False])
def test_seed_is_recorded_in_environment(workers):
    seed_everything(7, workers=workers)
    assert os.environ[SEED_ENV] == "7"
    assert global_seed() == 7
    assert seed_workers_enabled() is workers


def test_seed_none_reads_environment(monkeypatch):
    monkeypatch.setenv(SEED_ENV, "99")
    assert seed_everything() == 99


def test_seed_none_picks_random_seed_with_warning():
    with pytest.warns(UserWarning, match="picked seed="):
        seed = seed_everything()
    assert 0 <= seed <= MAX_SEED
    assert global_seed() == seed


@pytest.mark.parametrize("bad", [-1, MAX_SEED + 1, 2**64])
def test_out_of_range_seed_is_refused(bad):
    with pytest.raises(ValueError, match=rf"seed={bad} is out of range"):
        seed_everything(bad)


@pytest.mark.parametrize("bad", ["1", 1.5, True, None.__class__])
def test_non_int_seed_is_refused(bad):
    with pytest.raises(TypeError, match="seed="):
        seed_everything(bad)


def test_numpy_integer_seed_is_accepted():
    assert seed_everything(np.int64(5)) == 5


def test_bad_environment_seed_names_the_variable(monkeypatch):
    monkeypatch.setenv(SEED_ENV, "abc")
    with pytest.raises(ValueError, match=SEED_ENV):
        seed_everything()
    with pytest.raises(ValueError, match=SEED_ENV):
        global_seed()


@given(st.tuples(st.integers(0, 2**32), st.integers(0, 1000), st.integers(0, 64)))
def test_derive_seed_is_deterministic_and_order_sensitive(parts):
    seed = derive_seed(*parts)
    assert seed == derive_seed(*parts)
    assert 0 <= seed < 2**63
    a, b, c = parts
    if b != c:
        assert derive_seed(a, b, c) != derive_seed(a, c, b)


def test_worker_init_fn_depends_on_torch_seed_worker_and_rank():
    results = {}
    for torch_seed in (1, 2):
        for worker_id in (0, 1):
            for rank in (0, 1):
                torch.manual_seed(torch_seed)
                worker_init_fn(worker_id, rank)
                results[(torch_seed, worker_id, rank)] = _draw()
    assert len(set(results.values())) == len(results)
    torch.manual_seed(2)
    worker_init_fn(1, 1)
    assert _draw() == results[(2, 1, 1)]


def test_worker_init_fn_reads_rank_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    torch.manual_seed(0)
    worker_init_fn(0)
    from_env = _draw()
    torch.manual_seed(0)
    worker_init_fn(0, 3)
    assert _draw() == from_env


def _record(worker_id, calls=[]):  # noqa: B006 - module-level record for the chaining test
    calls.append(worker_id)
    return calls


def test_seeding_worker_init_chains_user_function():
    calls = _record.__defaults__[0]
    calls.clear()
    init = SeedingWorkerInit(rank=1, user_fn=_record)
    torch.manual_seed(0)
    init(4)
    assert calls == [4]
    seeded = _draw()
    torch.manual_seed(0)
    worker_init_fn(4, 1)
    assert _draw() == seeded
