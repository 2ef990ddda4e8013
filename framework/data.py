"""Data order for training: rebuild a user's DataLoader for resumable, sharded, seeded iteration.

``prepare_dataloader`` gives the loader a resumable sampler (sharded across ranks) and a private
``torch.Generator`` that is reseeded from ``(seed, epoch, rank)`` every epoch: the loader then never
draws from the global torch RNG (not even for its workers' base seed), and every worker of every rank
gets a distinct seed that is reproducible from the seed. ``DataFeed`` is what the training loop
iterates: ``(batch_idx, batch, is_last)`` per batch, limits, and O(1) mid-epoch resume.
"""

from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Iterator, Sized
from itertools import islice
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from framework.sampler import ResumableSampler, ShardedSampler, _as_int
from framework.seed import SeedingWorkerInit, derive_seed, seed_workers_enabled

_PREPARED_ATTR = "_kiln_prepared"


class _Prepared:
    """What ``prepare_dataloader`` records on a loader so each epoch can be reseeded."""

    __slots__ = ("seed", "rank", "generator")

    def __init__(self, seed: int, rank: int, generator: torch.Generator) -> None:
        self.seed, self.rank, self.generator = seed, rank, generator


def _sampler_and_batching(loader: DataLoader) -> tuple[Any, int | None, bool] | None:
    """(sampler, batch_size, drop_last) of a map-style loader, or None for a custom batch_sampler."""
    if loader.batch_sampler is None:  # batch_size=None: no automatic batching
        return loader.sampler, None, False
    if type(loader.batch_sampler) is BatchSampler:
        batch_sampler = loader.batch_sampler
        return batch_sampler.sampler, batch_sampler.batch_size, batch_sampler.drop_last
    return None


def _new_sampler(
    sampler: Any,
    dataset: Any,
    *,
    num_replicas: int,
    rank: int,
    seed: int,
    shuffle: bool | None,
    use_distributed_sampler: bool,
    even: bool,
) -> Sampler | None:
    """The resumable replacement for ``sampler``, or None to keep it (not sized: replayed on resume)."""
    shards = (num_replicas, rank) if use_distributed_sampler else (1, 0)
    if isinstance(sampler, ResumableSampler) and not isinstance(sampler, ShardedSampler):
        kept = sampler.shuffle if shuffle is None else shuffle
        return ResumableSampler(dataset, *shards, kept, sampler.seed, sampler.drop_last, even)
    if isinstance(sampler, DistributedSampler):
        if not use_distributed_sampler:  # the user sharded by hand: keep their topology
            shards = (sampler.num_replicas, sampler.rank)
        kept = sampler.shuffle if shuffle is None else shuffle
        return ResumableSampler(dataset, *shards, kept, sampler.seed, sampler.drop_last, even)
    plain_random = type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None
    if plain_random or type(sampler) is SequentialSampler:
        kept = plain_random if shuffle is None else shuffle
        return ResumableSampler(dataset, *shards, kept, seed, False, even)
    if isinstance(sampler, Sized):
        return ShardedSampler(sampler, *shards, seed, False, even)
    return None


def prepare_dataloader(
    dataloader: DataLoader,
    *,
    num_replicas: int,
    rank: int,
    seed: int,
    shuffle: bool | None = None,
    use_distributed_sampler: bool = True,
    even_batches: bool = True,
) -> DataLoader:
    """Rebuild ``dataloader`` for sharded, seeded, resumable iteration; the original is untouched.

    - Map-style datasets get a :class:`ResumableSampler` sharded over ``num_replicas`` (shuffle taken
      from ``RandomSampler``/``SequentialSampler``/``DistributedSampler`` unless ``shuffle`` is given;
      a ``DistributedSampler``'s seed and drop_last are kept). Any other sized sampler is wrapped in a
      :class:`ShardedSampler`. ``even_batches=True`` pads so every rank gets the same number of
      batches; ``False`` pads nothing. ``batch_size``/``drop_last`` stay on the batch sampler.
    - ``use_distributed_sampler=False`` does not shard (a ``DistributedSampler`` keeps its own
      ``num_replicas``/``rank``), but the order is still made resumable.
    - A custom ``batch_sampler``, an unsized sampler or an ``IterableDataset`` keep their sampling;
      :class:`DataFeed` resumes them through the dataset's ``state_dict`` or by replaying batches.
    - Every loader gets a private ``torch.Generator`` (replacing any the user set) that
      :func:`set_dataloader_epoch` reseeds from ``(seed, epoch, rank)``. After
      ``seed_everything(workers=True)`` the user's ``worker_init_fn`` is chained after
      :func:`framework.seed.worker_init_fn`. With ``persistent_workers=True`` workers start (and are
      seeded) once, at the first epoch iterated, and their RNG streams continue across epochs.
    - A ``DataLoader`` subclass is shallow-copied with these fields replaced; its ``__init__`` is
      not run again, so attributes it derived from the old sampler are not updated.
    """
    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            f"dataloader={type(dataloader).__name__} is not a torch.utils.data.DataLoader; wrap your data "
            "in one (DataLoader(dataset, batch_size=...))."
        )
    num_replicas = _as_int(num_replicas, "num_replicas", 1)
    rank = _as_int(rank, "rank", 0)
    if rank >= num_replicas:
        raise ValueError(f"rank={rank} is out of range for num_replicas={num_replicas}.")
    seed = _as_int(seed, "seed")

    kwargs: dict[str, Any] = {}
    if not isinstance(dataloader.dataset, IterableDataset):
        batching = _sampler_and_batching(dataloader)
        if batching is None:
            kwargs["batch_sampler"] = dataloader.batch_sampler
        else:
            sampler, batch_size, drop_last = batching
            new = _new_sampler(
                sampler,
                dataloader.dataset,
                num_replicas=num_replicas,
                rank=rank,
                seed=seed,
                shuffle=shuffle,
                use_distributed_sampler=use_distributed_sampler,
                even=even_batches,
            )
            kwargs.update(sampler=sampler if new is None else new, batch_size=batch_size, drop_last=drop_last)
    else:
        kwargs.update(batch_size=dataloader.batch_size, drop_last=dataloader.drop_last)

    user_init = dataloader.worker_init_fn
    if isinstance(user_init, SeedingWorkerInit):  # prepared before: don't chain twice
        user_init = user_init.user_fn
    generator = torch.Generator()
    kwargs.update(
        dataset=dataloader.dataset,
        num_workers=dataloader.num_workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        worker_init_fn=SeedingWorkerInit(rank, user_init) if seed_workers_enabled() else user_init,
        multiprocessing_context=dataloader.multiprocessing_context,
        generator=generator,
        prefetch_factor=dataloader.prefetch_factor,
        persistent_workers=dataloader.persistent_workers,
        pin_memory_device=dataloader.pin_memory_device,
    )
    if hasattr(dataloader, "in_order"):  # torch >= 2.6
        kwargs["in_order"] = dataloader.in_order
    rebuilt = DataLoader(**kwargs)
    if type(dataloader) is not DataLoader:
        rebuilt = _onto_subclass(dataloader, rebuilt)
    setattr(rebuilt, _PREPARED_ATTR, _Prepared(seed, rank, generator))
    return rebuilt


def _onto_subclass(original: DataLoader, rebuilt: DataLoader) -> DataLoader:
    clone = copy.copy(original)
    for name, value in vars(rebuilt).items():
        object.__setattr__(clone, name, value)  # bypass DataLoader's set-once guard
    object.__setattr__(clone, "_iterator", None)
    return clone


def set_dataloader_epoch(dataloader: DataLoader, epoch: int) -> None:
    """Select ``epoch`` everywhere the order depends on it: the loader's generator (reseeded from
    ``(seed, epoch, rank)`` when prepared) and any ``set_epoch`` of sampler, batch sampler or dataset."""
    prepared = getattr(dataloader, _PREPARED_ATTR, None)
    if prepared is not None:
        prepared.generator.manual_seed(derive_seed(prepared.seed, epoch, prepared.rank))
    batch_sampler = dataloader.batch_sampler
    targets = (
        dataloader.sampler,
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
        dataloader.dataset,
    )
    seen: set[int] = set()
    for target in targets:
        if target is not None and id(target) not in seen and hasattr(target, "set_epoch"):
            seen.add(id(target))
            target.set_epoch(epoch)


def resolve_limit(length: int | None, limit: int | float | None,
                  name: str = "limit_batches") -> tuple[int | None, int | None]:
    """(num_batches, stop): the known epoch length after the limit, and the cap on batches."""
    if limit is None:
        return length, length
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise TypeError(f"{name}={limit!r} must be an int (a count), a float in [0, 1] or None.")
    if isinstance(limit, int):
        if limit < 0:
            raise ValueError(f"{name}={limit} is negative; pass a count >= 0.")
        return (None, limit) if length is None else (min(length, limit),) * 2
    if not 0.0 <= limit <= 1.0:
        raise ValueError(f"{name}={limit} is a float outside [0, 1]; pass a fraction or an int count.")
    if length is None:
        if limit == 1.0:
            return None, None
        raise ValueError(
            f"{name}={limit} is a fraction but the dataloader has no length; pass an int count."
        )
    count = int(length * limit)
    if count == 0 and limit > 0:
        raise ValueError(
            f"{name}={limit} of {length} batches gives 0 batches; pass a larger fraction or an int."
        )
    return count, count


def _loader_length(loader: DataLoader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an IterableDataset without __len__
        return None


class DataFeed:
    """One epoch of batches at a time, as ``(batch_idx, batch, is_last)``, resumable mid-epoch.

    ``is_last`` comes from the length when it is known (no lookahead: fetching a batch early would
    draw the dataset's random numbers early and break exact resume); only a loader without a length
    is read one batch ahead. ``limit_batches``: an int caps the batches per epoch, a float in [0, 1]
    takes that fraction of ``len(dataloader)``.

    Resuming: ``epoch_batches(epoch, start)`` skips ``start`` batches in O(1) through the resumable
    sampler (map-style), through the dataset's own ``load_state_dict`` for an iterable dataset that
    has one (with ``num_workers=0``), and otherwise by replaying them, with a warning. After
    ``load_state_dict`` call ``epoch_batches(feed.epoch, feed.batches_consumed)``.
    """

    def __init__(self, dataloader: DataLoader, limit_batches: int | float | None = None,
                 limit_name: str = "limit_batches") -> None:
        if not isinstance(dataloader, DataLoader):
            raise TypeError(f"dataloader={type(dataloader).__name__} is not a torch.utils.data.DataLoader.")
        self.dataloader = dataloader
        self.num_batches, self._stop = resolve_limit(_loader_length(dataloader), limit_batches, limit_name)
        self.epoch = 0
        self.batches_consumed = 0
        dataset = dataloader.dataset
        self._stateful = (
            isinstance(dataset, IterableDataset)
            and dataloader.num_workers == 0
            and callable(getattr(dataset, "state_dict", None))
            and callable(getattr(dataset, "load_state_dict", None))
        )
        self._dataset_state: Any = None  # snapshot taken before a lookahead fetch
        self._pending_dataset_state: Any = None
        self._warned_replay = False

    # ---- iteration ---------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Any, bool]]:
        """Yield ``(batch_idx, batch, is_last)`` for ``epoch``, starting at batch ``start``.

        Set-up (epoch seeding, skipping) runs when the first batch is requested.
        """
        epoch = _as_int(epoch, "epoch", 0)
        start = _as_int(start, "start", 0)
        self.epoch, self.batches_consumed = epoch, start
        self._dataset_state = None
        stop = self._stop
        if stop is not None and start >= stop:
            return
        loader = self.dataloader
        set_dataloader_epoch(loader, epoch)
        replay = self._skip_to(start) if start else 0
        iterator = iter(loader)
        if replay:
            deque(islice(iterator, replay), maxlen=0)
        if self.num_batches is None:
            yield from self._with_lookahead(iterator, start, stop)
            return
        last = stop - 1
        for batch_idx, batch in zip(range(start, stop), iterator):  # range first: no extra fetch
            self.batches_consumed = batch_idx + 1
            yield batch_idx, batch, batch_idx == last
        if self.batches_consumed < stop:
            warnings.warn(
                f"the dataloader yielded {self.batches_consumed} batches but its len() is {stop}; "
                "is_last was never set this epoch. Fix the dataset's __len__.",
                stacklevel=2,
            )

    def _with_lookahead(self, iterator: Iterator, start: int, stop: int | None) -> Iterator:
        batch_idx = start
        try:
            batch = next(iterator)
        except StopIteration:
            return
        while True:
            if stop is not None and batch_idx == stop - 1:
                self._dataset_state = None
                self.batches_consumed = stop
                yield batch_idx, batch, True
                return
            if self._stateful:
                self._dataset_state = self.dataloader.dataset.state_dict()
            try:
                upcoming, is_last = next(iterator), False
            except StopIteration:
                upcoming, is_last = None, True
            self.batches_consumed = batch_idx + 1
            yield batch_idx, batch, is_last
            if is_last:
                return
            batch, batch_idx = upcoming, batch_idx + 1

    def _skip_to(self, start: int) -> int:
        """Position the loader at batch ``start``; returns how many batches must be replayed."""
        loader = self.dataloader
        sampler, batch_sampler = loader.sampler, loader.batch_sampler
        if isinstance(sampler, ResumableSampler) and (
            batch_sampler is None or type(batch_sampler) is BatchSampler
        ):
            batch_size = 1 if batch_sampler is None else batch_sampler.batch_size
            sampler.start_at(min(len(sampler), start * batch_size))
            return 0
        if self._stateful and self._pending_dataset_state is not None:
            loader.dataset.load_state_dict(self._pending_dataset_state)
            self._pending_dataset_state = None
            return 0
        if not self._warned_replay:
            self._warned_replay = True
            warnings.warn(
                f"resuming at batch {start} replays the skipped batches: this loader's position can't be "
                "restored directly (custom batch_sampler, unsized sampler, or an IterableDataset without "
                "state_dict/load_state_dict or with num_workers>0).",
                stacklevel=3,
            )
        return start

    # ---- checkpointing -----------------------------------------------------------------------
    @property
    def num_replicas(self) -> int | None:
        """Processes the epoch's order is dealt to (Kiln's sampler); None when the position is per rank only."""
        sampler = self.dataloader.sampler
        return sampler.num_replicas if isinstance(sampler, ResumableSampler) else None

    @property
    def batch_size(self) -> int | None:
        return getattr(self.dataloader, "batch_size", None)

    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, batches consumed), seeds, and a stateful iterable dataset's own state; the sharding
        (``num_replicas``, ``batch_size``) lets ``framework.reshard`` map the position to another world size."""
        prepared = getattr(self.dataloader, _PREPARED_ATTR, None)
        sampler = self.dataloader.sampler
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "seed": None if prepared is None else prepared.seed,
            "sampler_seed": sampler.seed if isinstance(sampler, ResumableSampler) else None,
            "num_replicas": self.num_replicas,
            "batch_size": self.batch_size,
        }
        if self._stateful:
            dataset_state = self._dataset_state
            state["dataset"] = (
                self.dataloader.dataset.state_dict() if dataset_state is None else dataset_state
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position and seeds; the next ``epoch_batches(self.epoch, self.batches_consumed)``
        continues where the saved run was."""
        self.epoch = _as_int(state["epoch"], "state['epoch']", 0)
        self.batches_consumed = _as_int(state["batches_consumed"], "state['batches_consumed']", 0)
        prepared = getattr(self.dataloader, _PREPARED_ATTR, None)
        if prepared is not None and state.get("seed") is not None:
            prepared.seed = _as_int(state["seed"], "state['seed']")
        sampler = self.dataloader.sampler
        if isinstance(sampler, ResumableSampler) and state.get("sampler_seed") is not None:
            sampler.seed = _as_int(state["sampler_seed"], "state['sampler_seed']")
        self._pending_dataset_state = state.get("dataset")
