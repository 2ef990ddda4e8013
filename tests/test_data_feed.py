"""DataFeed (framework/data.py): is_last without lookahead, limit_batches, O(1) mid-epoch resume, state_dict."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from toy_datasets import CountingDataset, SizedStreamDataset, StreamDataset

from framework.data import DataFeed, prepare_dataloader
from framework.seed import seed_everything


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
