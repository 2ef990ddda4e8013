"""A tiny TrainModule and random datasets for smoke tests (Lightning's ``BoringModel`` idea).

``BoringModule`` trains out of the box (``trainer.fit(BoringModule())``): it brings its own loaders,
optimizer and every step method, so a test exercises the Trainer, a strategy or a callback without
writing a model. Data is generated from a seed of its own, never from the global RNG, so two runs
see the same batches whatever else consumed random numbers. Re-exported by :mod:`framework.testing`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from framework.module import TrainModule

__all__ = ["BoringModule", "RandomDataset", "RandomIterableDataset"]


def _random_rows(size: int, length: int, seed: int) -> torch.Tensor:
    for name, value in (("size", size), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not valid; pass an int >= 1.")
    return torch.randn(length, size, generator=torch.Generator().manual_seed(seed))


class RandomDataset(Dataset):
    """``length`` random float32 vectors of shape ``(size,)``, the same for the same ``seed``."""

    def __init__(self, size: int = 32, length: int = 64, seed: int = 0) -> None:
        self.data = _random_rows(size, length, seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]


class RandomIterableDataset(IterableDataset):
    """The rows of ``RandomDataset(size, count, seed)`` as a stream without ``__len__``.

    The stream is split between dataloader workers and, in a distributed job, between ranks (row ``i``
    goes to rank ``i % world_size``), as an iterable dataset must do itself: samplers cannot shard it.
    """

    def __init__(self, size: int = 32, count: int = 64, seed: int = 0) -> None:
        self.data = _random_rows(size, count, seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        rank, world = _rank_and_world()
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        mine = self.data[rank::world]
        yield from mine[worker_id::workers]


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BoringModule(TrainModule):
    """``Linear(in_features, out_features)`` trained to output zeros (MSE) with SGD; logs each stage's loss.

    Batches are tensors of shape ``(batch, in_features)`` or tuples/lists whose first item is one.
    The ``*_dataloader`` hooks serve ``RandomDataset(in_features, length)`` in batches of ``batch_size``
    (validation/test/predict use different seeds than training). Override any method to test a variant.
    """

    def __init__(self, in_features: int = 32, out_features: int = 2, *, lr: float = 0.1, batch_size: int = 2,
                 length: int = 64) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(in_features, out_features)
        self.in_features = in_features
        self.lr = lr
        self.batch_size = batch_size
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def loss(self, batch: Any) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).pow(2).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0] if isinstance(batch, (list, tuple)) else batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def _loader(self, seed: int) -> DataLoader:
        return DataLoader(RandomDataset(self.in_features, self.length, seed), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(seed=0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(seed=1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(seed=2)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(seed=3)
