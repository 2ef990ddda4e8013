"""ResumableSampler partitioning, prepare_dataloader, worker seeding and DataFeed."""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
    WeightedRandomSampler,
    get_worker_info,
)

from framework.data import DataFeed, prepare_dataloader, set_dataloader_epoch
from framework.sampler import ResumableSampler, ShardedSampler
from framework.seed import SEED_ENV, WORKERS_ENV, SeedingWorkerInit, seed_everything


class CountingDataset(Dataset):
    """Map-style dataset of ``n`` ints that counts ``__getitem__`` calls."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        self.calls += 1
        return index


class StreamDataset(IterableDataset):
    """Iterable of ints from a resumable position; ``sized`` decides whether it has a __len__."""

    def __init__(self, n: int, stateful: bool = True) -> None:
        self.n, self.position, self.yielded = n, 0, 0
        if stateful:
            self.state_dict = lambda: {"position": self.position}
            self.load_state_dict = lambda state: setattr(self, "position", state["position"])

    def __iter__(self):
        while self.position < self.n:
            value = self.position
            self.position += 1
            self.yielded += 1
            yield value
        self.position = 0


class SizedStreamDataset(StreamDataset):
    def __len__(self) -> int:
        return self.n


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


# ---- prepare_dataloader ------------------------------------------------------------------------
def _collate(batch):
    return torch.tensor(batch)


def test_prepare_keeps_loader_settings_and_detects_shuffle():
    dataset = CountingDataset(10)
    loader = DataLoader(dataset, batch_size=3, shuffle=True, drop_last=True, collate_fn=_collate, timeout=0)
    prepared = prepare_dataloader(loader, num_replicas=2, rank=1, seed=4)
    assert prepared is not loader and loader.sampler.__class__.__name__ == "RandomSampler"
    assert isinstance(prepared.sampler, ResumableSampler) and prepared.sampler.shuffle
    assert (prepared.batch_size, prepared.drop_last, prepared.collate_fn) == (3, True, _collate)
    assert (prepared.sampler.num_replicas, prepared.sampler.rank, prepared.sampler.seed) == (2, 1, 4)
    assert isinstance(prepared.generator, torch.Generator)
    sequential = prepare_dataloader(DataLoader(dataset), num_replicas=1, rank=0, seed=4)
    assert not sequential.sampler.shuffle
    forced = prepare_dataloader(loader, num_replicas=1, rank=0, seed=4, shuffle=False)
    assert not forced.sampler.shuffle


def test_prepare_keeps_a_distributed_samplers_seed_and_drop_last():
    dataset = CountingDataset(11)
    user = DistributedSampler(dataset, num_replicas=3, rank=2, shuffle=False, seed=9, drop_last=True)
    prepared = prepare_dataloader(DataLoader(dataset, sampler=user), num_replicas=2, rank=0, seed=1)
    sampler = prepared.sampler
    assert (sampler.num_replicas, sampler.rank, sampler.shuffle, sampler.seed, sampler.drop_last) == (
        2,
        0,
        False,
        9,
        True,
    )
    kept = prepare_dataloader(
        DataLoader(dataset, sampler=user), num_replicas=2, rank=0, seed=1, use_distributed_sampler=False
    )
    assert (kept.sampler.num_replicas, kept.sampler.rank) == (3, 2)


@pytest.mark.parametrize("even", [True, False])
def test_even_batches_across_ranks(even):
    loader = DataLoader(CountingDataset(10), batch_size=2)
    batches = [
        list(prepare_dataloader(loader, num_replicas=4, rank=r, seed=0, even_batches=even)) for r in range(4)
    ]
    counts = [len(b) for b in batches]
    items = sorted(int(i) for rank in batches for batch in rank for i in batch)
    if even:
        assert counts == [2, 2, 2, 2] and set(items) == set(range(10))
    else:
        assert counts == [2, 2, 1, 1] and items == list(range(10))


def test_use_distributed_sampler_false_does_not_shard():
    loader = DataLoader(CountingDataset(10), batch_size=5, shuffle=True)
    prepared = prepare_dataloader(loader, num_replicas=2, rank=1, seed=0, use_distributed_sampler=False)
    assert sorted(int(i) for batch in prepared for i in batch) == list(range(10))
    assert prepared.generator is not None


def test_custom_batch_sampler_and_iterable_dataset_keep_their_sampling():
    dataset = CountingDataset(10)
    batch_sampler = [[0, 1], [5, 6, 7]]
    prepared = prepare_dataloader(
        DataLoader(dataset, batch_sampler=batch_sampler), num_replicas=2, rank=0, seed=0
    )
    assert prepared.batch_sampler is batch_sampler
    assert [b.tolist() for b in prepared] == batch_sampler
    stream = prepare_dataloader(DataLoader(StreamDataset(5), batch_size=2), num_replicas=2, rank=1, seed=0)
    assert [b.tolist() for b in stream] == [[0, 1], [2, 3], [4]]


def test_explicit_batch_sampler_is_unpacked_into_a_resumable_one():
    dataset = CountingDataset(10)
    loader = DataLoader(dataset, batch_sampler=BatchSampler(SequentialSampler(dataset), 4, True))
    prepared = prepare_dataloader(loader, num_replicas=1, rank=0, seed=0)
    assert isinstance(prepared.sampler, ResumableSampler)
    assert [b.tolist() for b in prepared] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_custom_sampler_is_wrapped_without_touching_global_rng():
    dataset = CountingDataset(30)
    loader = DataLoader(dataset, sampler=WeightedRandomSampler([1.0] * 30, 30), batch_size=4)
    prepared = prepare_dataloader(loader, num_replicas=2, rank=0, seed=0)
    assert isinstance(prepared.sampler, ShardedSampler)
    state = torch.get_rng_state()
    first = [b.tolist() for b in prepared]
    assert torch.equal(state, torch.get_rng_state())
    assert first == [b.tolist() for b in prepared]


@pytest.mark.parametrize(
    "make",
    [
        lambda ds: DataLoader(ds, batch_size=4, shuffle=True),
        lambda ds: DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * len(ds), len(ds))),
    ],
    ids=["random", "weighted"],
)
def test_preparing_twice_equals_preparing_once(make):
    loader = make(CountingDataset(30))
    once = prepare_dataloader(loader, num_replicas=2, rank=1, seed=3)
    twice = prepare_dataloader(
        prepare_dataloader(loader, num_replicas=3, rank=0, seed=3), num_replicas=2, rank=1, seed=3
    )
    for epoch in (0, 1):
        set_dataloader_epoch(once, epoch)
        set_dataloader_epoch(twice, epoch)
        assert [b.tolist() for b in once] == [b.tolist() for b in twice]


class _TaggedLoader(DataLoader):
    def __init__(self, dataset, tag, **kwargs):
        super().__init__(dataset, **kwargs)
        self.tag = tag


def test_subclass_is_rebuilt_keeping_its_type_and_attributes():
    loader = _TaggedLoader(CountingDataset(8), "mine", batch_size=2, shuffle=True)
    prepared = prepare_dataloader(loader, num_replicas=2, rank=0, seed=0)
    assert type(prepared) is _TaggedLoader and prepared.tag == "mine"
    assert isinstance(prepared.sampler, ResumableSampler) and len(prepared) == 2
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler)


@pytest.mark.parametrize("bad, error", [(object(), TypeError), (DataLoader(range(3)), ValueError)])
def test_prepare_refuses_bad_input(bad, error):
    with pytest.raises(error):
        prepare_dataloader(bad, num_replicas=2, rank=2, seed=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_prepared_loader_never_draws_from_global_rng(num_workers):
    loader = DataLoader(CountingDataset(12), batch_size=3, shuffle=True, num_workers=num_workers)
    prepared = prepare_dataloader(loader, num_replicas=1, rank=0, seed=0)
    before = torch.get_rng_state()
    for epoch in range(2):
        set_dataloader_epoch(prepared, epoch)
        list(prepared)
    assert torch.equal(before, torch.get_rng_state())


# ---- worker seeds ------------------------------------------------------------------------------
class SeedReportingDataset(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index):
        return get_worker_info().id, torch.initial_seed(), random.random(), float(np.random.rand())


def _worker_draws(workers_flag, monkeypatch):
    monkeypatch.setenv(SEED_ENV, "17")
    monkeypatch.setenv(WORKERS_ENV, "1" if workers_flag else "0")
    draws = {}
    loader = DataLoader(SeedReportingDataset(), batch_size=None, num_workers=2, timeout=60)
    for rank in range(2):
        prepared = prepare_dataloader(loader, num_replicas=2, rank=rank, seed=17)
        assert isinstance(prepared.worker_init_fn, SeedingWorkerInit) is workers_flag
        for epoch in range(2):
            set_dataloader_epoch(prepared, epoch)
            for worker, torch_seed, py_draw, np_draw in prepared:
                draws.setdefault((rank, epoch, int(worker)), []).append(
                    (int(torch_seed), float(py_draw), float(np_draw))
                )
    return draws


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers_flag", [True, False])
def test_worker_seeds_distinct_per_rank_worker_epoch_and_reproducible(workers_flag, monkeypatch):
    draws = _worker_draws(workers_flag, monkeypatch)
    assert len(draws) == 2 * 2 * 2
    torch_seeds = {key: values[0][0] for key, values in draws.items()}
    assert len(set(torch_seeds.values())) == len(torch_seeds)
    for column in (1, 2):  # python random and numpy differ too
        assert len({values[0][column] for values in draws.values()}) == len(draws)
    assert _worker_draws(workers_flag, monkeypatch) == draws


# ---- DataFeed ----------------------------------------------------------------------------------
def _feed(n=10, batch_size=3, limit=None, **prepare):
    dataset = CountingDataset(n)
    loader = prepare_dataloader(
        DataLoader(dataset, batch_size=batch_size, **prepare), num_replicas=1, rank=0, seed=0
    )
    return DataFeed(loader, limit), dataset


def test_is_last_from_known_length_without_lookahead():
    feed, dataset = _feed(10, 3)
    assert feed.num_batches == 4
    seen = []
    for batch_idx, _batch, is_last in feed.epoch_batches(0):
        assert dataset.calls == min(10, 3 * (batch_idx + 1))  # nothing fetched ahead
        seen.append((batch_idx, is_last))
    assert seen == [(0, False), (1, False), (2, False), (3, True)]


@pytest.mark.parametrize("limit, expected", [(2, 2), (100, 4), (0.5, 2), (1.0, 4), (0, 0), (None, 4)])
def test_limit_batches(limit, expected):
    feed, dataset = _feed(10, 3, limit)
    batches = list(feed.epoch_batches(0))
    assert feed.num_batches == expected == len(batches)
    assert [last for *_, last in batches] == [i == expected - 1 for i in range(expected)]
    assert dataset.calls == min(10, 3 * expected)


@pytest.mark.parametrize(
    "limit, error",
    [(0.01, ValueError), (-1, ValueError), (1.5, ValueError), ("2", TypeError), (True, TypeError)],
)
def test_bad_limit_batches_is_refused(limit, error):
    with pytest.raises(error, match="limit_batches"):
        _feed(10, 3, limit)


@pytest.mark.parametrize("limit, expected", [(None, 4), (2, 2), (1.0, 4)])
def test_is_last_by_lookahead_for_unknown_length(limit, expected):
    stream = StreamDataset(10, stateful=False)
    feed = DataFeed(
        prepare_dataloader(DataLoader(stream, batch_size=3), num_replicas=1, rank=0, seed=0), limit
    )
    assert feed.num_batches is None
    batches = list(feed.epoch_batches(0))
    assert [(i, last) for i, _, last in batches] == [(i, i == expected - 1) for i in range(expected)]
    assert stream.yielded == min(10, 3 * expected)  # a limit stops without fetching further


def test_fraction_limit_needs_a_length():
    loader = DataLoader(StreamDataset(10, stateful=False), batch_size=3)
    with pytest.raises(ValueError, match="no length"):
        DataFeed(loader, 0.5)


def test_resume_is_o1_for_map_style_datasets():
    feed, dataset = _feed(200_000, 4, shuffle=True)
    sampler = feed.dataloader.sampler
    sampler.set_epoch(2)
    order = sampler.epoch_indices()
    batch_idx, batch, is_last = next(iter(feed.epoch_batches(2, start=10_000)))
    assert dataset.calls == 4  # the skipped 40_000 samples were never loaded
    assert batch_idx == 10_000 and not is_last
    assert batch.tolist() == order[40_000:40_004].tolist()


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resumed_epoch_equals_tail_of_uninterrupted_epoch(shuffle, drop_last):
    feed, _ = _feed(23, 4, shuffle=shuffle, drop_last=drop_last)
    full = [(i, b.tolist(), last) for i, b, last in feed.epoch_batches(1)]
    for start in range(len(full) + 1):
        resumed = [(i, b.tolist(), last) for i, b, last in feed.epoch_batches(1, start)]
        assert resumed == full[start:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("persistent", [False, True])
def test_resume_with_worker_processes(persistent):
    feed, _ = _feed(40, 4, shuffle=True, num_workers=2, persistent_workers=persistent, timeout=30)
    full = [b.tolist() for _, b, _ in feed.epoch_batches(1)]
    assert [b.tolist() for _, b, _ in feed.epoch_batches(1, 3)] == full[3:]
    assert [b.tolist() for _, b, _ in feed.epoch_batches(1)] == full


def test_state_dict_restores_position_and_seed():
    feed, _ = _feed(40, 4, shuffle=True)
    batches = feed.epoch_batches(3)
    for _ in range(4):
        next(batches)
    state = feed.state_dict()
    assert (state["epoch"], state["batches_consumed"], state["seed"]) == (3, 4, 0)
    tail = [b.tolist() for _, b, _ in batches]

    other = prepare_dataloader(
        DataLoader(CountingDataset(40), batch_size=4, shuffle=True), num_replicas=1, rank=0, seed=99
    )
    fresh = DataFeed(other)
    fresh.load_state_dict(state)
    assert [b.tolist() for _, b, _ in fresh.epoch_batches(fresh.epoch, fresh.batches_consumed)] == tail


@pytest.mark.parametrize("dataset_cls", [SizedStreamDataset, StreamDataset])
def test_stateful_iterable_dataset_resumes_through_its_state(dataset_cls):
    def make():
        stream = dataset_cls(20)
        loader = prepare_dataloader(DataLoader(stream, batch_size=3), num_replicas=1, rank=0, seed=0)
        return DataFeed(loader), stream

    feed, _ = make()
    batches = feed.epoch_batches(0)
    for _ in range(3):
        next(batches)
    state = feed.state_dict()
    assert state["dataset"] == {"position": 9}  # a lookahead fetch does not leak into the state
    tail = [(i, b.tolist(), last) for i, b, last in batches]

    resumed, stream = make()
    resumed.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [(i, b.tolist(), last) for i, b, last in resumed.epoch_batches(0, resumed.batches_consumed)]
    assert got == tail
    assert stream.yielded == 20 - 9  # nothing replayed


def test_unresumable_loader_replays_with_one_warning():
    dataset = CountingDataset(12)
    loader = prepare_dataloader(
        DataLoader(dataset, batch_sampler=[[i, i + 1] for i in range(0, 12, 2)]),
        num_replicas=1,
        rank=0,
        seed=0,
    )
    feed = DataFeed(loader)
    full = [b.tolist() for _, b, _ in feed.epoch_batches(0)]
    with pytest.warns(UserWarning, match="replays"):
        assert [b.tolist() for _, b, _ in feed.epoch_batches(0, 2)] == full[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [b.tolist() for _, b, _ in feed.epoch_batches(0, 3)] == full[3:]


def test_epochs_differ_and_set_epoch_reaches_the_sampler():
    feed, _ = _feed(30, 5, shuffle=True)
    first = [b.tolist() for _, b, _ in feed.epoch_batches(0)]
    second = [b.tolist() for _, b, _ in feed.epoch_batches(1)]
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    assert feed.dataloader.sampler.epoch == 1
    assert [b.tolist() for _, b, _ in feed.epoch_batches(0)] == first


def test_exact_resume_with_random_items_in_main_process():
    """Saving (feed state + RNG) mid-epoch and resuming in a fresh setting draws the same numbers."""
    from framework.rng import capture_rng_state, restore_rng_state

    class Noisy(Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, index):
            return torch.tensor([float(index), float(torch.rand(()))])

    def run(feed, epochs, start_epoch=0, start=0, stop_after=None):
        out, saved = [], None
        for epoch in range(start_epoch, epochs):
            for batch_idx, batch, _ in feed.epoch_batches(epoch, start if epoch == start_epoch else 0):
                out.append((batch + torch.rand(()).item()).tolist())  # a "dropout" draw per step
                if stop_after == (epoch, batch_idx):
                    saved = (feed.state_dict(), capture_rng_state())
        return out, saved

    def make(seed):
        seed_everything(seed)
        loader = DataLoader(Noisy(), batch_size=3, shuffle=True)
        return DataFeed(prepare_dataloader(loader, num_replicas=1, rank=0, seed=seed))

    full, (feed_state, rng_state) = run(make(5), 3, stop_after=(1, 2))
    resumed = make(6)
    resumed.load_state_dict(feed_state)
    restore_rng_state(rng_state)
    tail, _ = run(resumed, 3, resumed.epoch, resumed.batches_consumed)
    assert tail == full[len(full) - len(tail) :] and len(tail) == 4 + 7
