"""prepare_dataloader (sharding, loader settings kept, subclasses, global RNG untouched) and worker seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    SequentialSampler,
    WeightedRandomSampler,
    get_worker_info,
)
from toy_datasets import CountingDataset, StreamDataset

from framework.data import prepare_dataloader, set_dataloader_epoch
from framework.sampler import ResumableSampler, ShardedSampler
from framework.seed import SEED_ENV, WORKERS_ENV, SeedingWorkerInit


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
