"""Which dataset indices each predicted batch holds (``trainer.predict_loop.current_batch_indices``), for
``BasePredictionWriter``: the loader's batch sampler is wrapped so that every index list it hands out is
queued, and each batch taken from the loader takes the oldest one (loaders deliver batches in order, also
with workers that prefetch)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any


class _RecordingBatchSampler:
    """Yields what the wrapped batch sampler yields, queueing a copy of each index list."""

    def __init__(self, batch_sampler: Any, queue: deque) -> None:
        self.batch_sampler, self.queue = batch_sampler, queue

    def __iter__(self) -> Iterator[Any]:
        for indices in self.batch_sampler:
            self.queue.append(list(indices))
            yield indices

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.batch_sampler, name)


class PredictionIndices:
    """``current_batch_indices`` / ``epoch_batch_indices`` of the running predict stage (Lightning's names)."""

    def __init__(self) -> None:
        self.current_batch_indices: list[int] | None = None
        self.epoch_batch_indices: list[list[list[int] | None]] = []
        self._queue: deque = deque()

    def track(self, loader: Any) -> bool:
        """Start recording ``loader``'s batches; False when it has no batch sampler to record (iterable data)."""
        self._queue.clear()
        self.epoch_batch_indices.append([])
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None:
            return False
        if not isinstance(batch_sampler, _RecordingBatchSampler):
            # DataLoader refuses a new batch_sampler after construction; its iterators read this attribute.
            object.__setattr__(loader, "batch_sampler", _RecordingBatchSampler(batch_sampler, self._queue))
        else:
            batch_sampler.queue = self._queue
        return True

    def next_batch(self) -> None:
        self.current_batch_indices = self._queue.popleft() if self._queue else None
        self.epoch_batch_indices[-1].append(self.current_batch_indices)
