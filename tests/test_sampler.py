"""ResumableSampler partitioning, determinism and resume; ShardedSampler over a custom sampler (framework/sampler.py)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import WeightedRandomSampler

from framework.sampler import ResumableSampler, ShardedSampler


def _shards(n, replicas, **kwargs):
    samplers = [ResumableSampler(range(n), replicas, rank, **kwargs) for rank in range(replicas)]
    return [list(s) for s in samplers], samplers


_sizes = st.integers(0, 300)
_replicas = st.integers(1, 8)


# ---- ResumableSampler properties ---------------------------------------------------------------
@given(_sizes, _replicas, st.booleans(), st.integers(0, 2**32), st.integers(0, 50))
def test_uneven_sampler_yields_every_index_exactly_once(n, replicas, shuffle, seed, epoch):
    shards, samplers = _shards(n, replicas, shuffle=shuffle, seed=seed, even=False)
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(s) for s in samplers] == [len(shard) for shard in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@given(_sizes, _replicas, st.booleans(), st.integers(0, 2**32))
def test_even_sampler_gives_equal_counts_and_covers_everything(n, replicas, shuffle, seed):
    shards, samplers = _shards(n, replicas, shuffle=shuffle, seed=seed, even=True)
    expected = math.ceil(n / replicas)
    assert all(len(shard) == expected == len(s) for shard, s in zip(shards, samplers))
    seen = Counter(i for shard in shards for i in shard)
    assert set(seen) == set(range(n))
    assert sum(seen.values()) - n == expected * replicas - n  # only the padding repeats


@given(_sizes, _replicas, st.booleans())
def test_drop_last_sampler_drops_the_tail_without_duplicates(n, replicas, even):
    shards, _ = _shards(n, replicas, shuffle=True, seed=3, drop_last=True, even=even)
    flat = [i for shard in shards for i in shard]
    assert all(len(shard) == n // replicas for shard in shards)
    assert len(set(flat)) == len(flat) == (n // replicas) * replicas


@given(st.integers(20, 300), _replicas, st.integers(0, 2**32), st.integers(0, 50))
def test_sampler_is_deterministic_per_seed_and_epoch(n, replicas, seed, epoch):
    def order(seed, epoch):
        sampler = ResumableSampler(range(n), replicas, 0, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(seed, epoch) == order(seed, epoch)
    assert order(seed, epoch) != order(seed, epoch + 1)
    assert order(seed, epoch) != order(seed + 1, epoch)


@given(_sizes, _replicas, st.booleans(), st.booleans(), st.data())
def test_resume_at_any_position_is_the_tail_of_the_full_order(n, replicas, shuffle, even, data):
    rank = data.draw(st.integers(0, replicas - 1))
    sampler = ResumableSampler(range(n), replicas, rank, shuffle=shuffle, seed=11, even=even)
    sampler.set_epoch(4)
    full = list(sampler)
    position = data.draw(st.integers(0, len(full)))
    sampler.start_at(position)
    assert list(sampler) == full[position:]
    assert list(sampler) == full  # the offset applies to one iteration only


def test_unshuffled_sampler_keeps_dataset_order():
    assert list(ResumableSampler(range(10), 3, 1, shuffle=False, even=False)) == [1, 4, 7]


def test_sampler_state_dict_round_trip():
    sampler = ResumableSampler(range(50), 2, 1, seed=5)
    sampler.set_epoch(3)
    sampler.start_at(7)
    clone = ResumableSampler(range(50), 2, 1, seed=0)
    clone.load_state_dict(sampler.state_dict())
    assert list(clone) == list(sampler)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_replicas": 0}, ValueError, "num_replicas=0"),
        ({"num_replicas": 2, "rank": 2}, ValueError, "rank=2"),
        ({"rank": -1}, ValueError, "rank=-1"),
        ({"seed": "1"}, TypeError, "seed="),
        ({"num_replicas": 2.0}, TypeError, "num_replicas="),
    ],
)
def test_sampler_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ResumableSampler(range(4), **kwargs)


def test_start_at_past_the_end_is_refused():
    with pytest.raises(ValueError, match="position=6"):
        ResumableSampler(range(10), 2, 0).start_at(6)


def test_sharded_sampler_makes_a_custom_sampler_rank_consistent_and_leaves_it_untouched():
    weighted = WeightedRandomSampler([1.0] * 40, num_samples=40)
    shards = [ShardedSampler(weighted, 2, rank, seed=1) for rank in range(2)]
    assert weighted.generator is None
    before = torch.get_rng_state()
    orders = [list(s) for s in shards]
    assert torch.equal(before, torch.get_rng_state())
    again = [list(ShardedSampler(weighted, 2, rank, seed=1)) for rank in range(2)]
    assert orders == again
    full = list(ShardedSampler(weighted, 1, 0, seed=1))
    assert sorted(orders[0] + orders[1]) == sorted(full)
