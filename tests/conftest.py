"""Shared fixtures: a tiny regression TrainModule, random data, Trainer defaults for fast tests.

Every test leaves ``DistributedState`` reset, so topology set by one test never leaks into the next.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from framework import DistributedState, Trainer, TrainModule

IN_FEATURES = 4


class TinyModule(TrainModule):
    """Linear regression ``IN_FEATURES -> 1`` with MSE; logs ``train_loss``/``val_loss``/``test_loss``."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(IN_FEATURES, 1)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def random_dataset(num_samples: int = 20, seed: int = 0) -> TensorDataset:
    """``(x, y)`` pairs of shapes ``(IN_FEATURES,)`` and ``(1,)``, reproducible per ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(num_samples, IN_FEATURES, generator=g), torch.randn(num_samples, 1, generator=g))


@pytest.fixture(autouse=True)
def _reset_distributed_state():
    yield
    DistributedState._reset_state()


@pytest.fixture
def tiny_module_cls() -> type[TinyModule]:
    """The TinyModule class, to subclass in a test."""
    return TinyModule


@pytest.fixture
def make_loader() -> Callable[..., DataLoader]:
    """``make_loader(num_samples=20, batch_size=4, seed=0, **dataloader_kwargs)`` over ``random_dataset``."""

    def make(num_samples: int = 20, batch_size: int = 4, seed: int = 0, **kwargs: Any) -> DataLoader:
        return DataLoader(random_dataset(num_samples, seed), batch_size=batch_size, **kwargs)

    return make


@pytest.fixture
def make_trainer(tmp_path) -> Callable[..., Trainer]:
    """A Trainer under ``tmp_path`` with no logger, checkpointing, progress bar, model summary or sanity check
    unless overridden (tests count validation steps exactly; the sanity check has tests of its own)."""

    def make(**kwargs: Any) -> Trainer:
        defaults = dict(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        return Trainer(**{**defaults, **kwargs})

    return make


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """URL of a local moto S3 server (one per test module); skips the test without moto[server] and s3fs."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    finally:
        server.stop()


@pytest.fixture
def memory_url():
    """A fresh ``memory://`` root for one test (the logger tests' remote log dirs), removed afterwards."""
    root = f"memory://kiln-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root[len("memory://") :]
    if fs.exists(path):
        fs.rm(path, recursive=True)
