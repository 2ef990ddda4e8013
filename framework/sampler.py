"""Distributed samplers that are deterministic per (seed, epoch) and resume in O(1).

``ResumableSampler`` shards a map-style dataset across ranks like torch's ``DistributedSampler``,
but draws its permutation from a private ``torch.Generator`` (never the global RNG) and can start an
epoch at any sample position by slicing the permutation, so a mid-epoch resume loads no skipped item.
``ShardedSampler`` does the same for an arbitrary user sampler (e.g. ``WeightedRandomSampler``).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from framework.seed import derive_seed


def _as_int(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is a bool; pass an int.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}; pass an int.") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}.")
    return value


class ResumableSampler(Sampler[int]):
    """Shards ``range(len(dataset))`` across ``num_replicas`` ranks; yields this ``rank``'s indices.

    - ``shuffle``: a permutation seeded by ``(seed, epoch)``, identical on every rank; call
      :meth:`set_epoch` before each epoch to get a new one.
    - ``drop_last``: drop the tail so every rank gets ``len(dataset) // num_replicas`` samples.
    - otherwise ``even=True`` pads by repeating indices from the start of the order so every rank
      gets ``ceil(len / num_replicas)`` samples (equal batch counts, some samples seen twice), and
      ``even=False`` pads nothing: every sample is seen exactly once, rank counts may differ by one.
    - :meth:`start_at` (or ``load_state_dict``) makes the next iteration skip the first ``n``
      samples of this rank's epoch order; ``len()`` stays the full epoch length.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        even: bool = True,
    ) -> None:
        self.num_replicas = _as_int(num_replicas, "num_replicas", 1)
        self.rank = _as_int(rank, "rank", 0)
        if self.rank >= self.num_replicas:
            raise ValueError(
                f"rank={self.rank} is out of range for num_replicas={self.num_replicas}; "
                f"pass a rank in [0, {self.num_replicas - 1}]."
            )
        self.dataset = dataset
        self.shuffle = bool(shuffle)
        self.seed = _as_int(seed, "seed")
        self.drop_last = bool(drop_last)
        self.even = bool(even)
        self.epoch = 0
        self._start = 0

    # ---- the epoch's order -------------------------------------------------------------------
    def _size(self) -> int:
        return len(self.dataset)

    def _global_order(self, size: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(size)
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, self.epoch))
        return torch.randperm(size, generator=generator)

    def _shard_length(self, size: int) -> int:
        if self.drop_last:
            return size // self.num_replicas
        if self.even:
            return math.ceil(size / self.num_replicas)
        return len(range(self.rank, size, self.num_replicas))

    def epoch_indices(self) -> torch.Tensor:
        """This rank's full index order for the current epoch (ignores :meth:`start_at`)."""
        size = self._size()
        order = self._global_order(size)
        if self.drop_last:
            order = order[: (size // self.num_replicas) * self.num_replicas]
        elif self.even and size:
            padding = math.ceil(size / self.num_replicas) * self.num_replicas - size
            if padding:
                order = torch.cat([order, order.repeat(math.ceil(padding / size))[:padding]])
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.epoch_indices()[start:].tolist())

    def __len__(self) -> int:
        return self._shard_length(self._size())

    # ---- position ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = _as_int(epoch, "epoch", 0)

    def start_at(self, position: int) -> None:
        """Make the next iteration skip this rank's first ``position`` samples of the epoch."""
        position = _as_int(position, "position", 0)
        if position > len(self):
            raise ValueError(
                f"position={position} is past the end of this rank's epoch ({len(self)} samples); "
                "pass a position in [0, len(sampler)]."
            )
        self._start = position

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "start": self._start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = _as_int(state["seed"], "state['seed']")
        self.set_epoch(state["epoch"])
        self.start_at(state.get("start", 0))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_replicas={self.num_replicas}, rank={self.rank}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, even={self.even})"
        )


class ShardedSampler(ResumableSampler):
    """Shards the order of a user's sampler across ranks, with the same padding and resume rules.

    Each epoch the wrapped sampler's indices are materialised (no dataset access) and sliced, so
    resuming still loads no skipped sample. A wrapped sampler with a ``generator`` attribute left at
    ``None`` (``RandomSampler``, ``WeightedRandomSampler``, ...) is copied and given a private generator
    seeded by ``(seed, epoch)``: its order is then the same on every rank and reproducible on resume.
    """

    def __init__(
        self,
        sampler: Sampler,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        even: bool = True,
    ) -> None:
        if isinstance(sampler, ShardedSampler):  # re-sharding: start again from the user's sampler
            sampler = sampler.source
        if not isinstance(sampler, Sized):
            raise TypeError(f"sampler={sampler!r} has no __len__; ShardedSampler needs a sized sampler.")
        super().__init__(sampler, num_replicas, rank, False, seed, drop_last, even)
        self.source = sampler
        self._generator = None
        if getattr(sampler, "generator", False) is None:
            sampler = copy.copy(sampler)  # the user's object keeps drawing from where it did
            self._generator = torch.Generator()
            sampler.generator = self._generator
        self.sampler = self.dataset = sampler

    def _global_order(self, size: int) -> torch.Tensor:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        if self._generator is not None:
            self._generator.manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        if len(order) != size:
            raise RuntimeError(
                f"sampler {self.sampler!r} yielded {len(order)} indices but its len() is {size}; "
                "make __len__ match __iter__."
            )
        return order

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sampler!r}, num_replicas={self.num_replicas}, rank={self.rank})"
