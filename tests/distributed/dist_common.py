"""Models, data and single-process references shared by the multi-process jobs in this directory.

The jobs run under ``framework.testing.run_distributed``; every rank imports this module. References are
plain PyTorch loops computed in-process, so a job compares Kiln's distributed result with them directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from framework import Trainer, TrainModule

FEATURES = 4


class Regression(TrainModule):
    """A small MLP regression; records the sample ids each training step saw (and whether it was a ghost)."""

    def __init__(self, lr: float = 0.1, hidden: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        self.lr = lr
        self.seen: list[tuple[list[int], bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, ids = batch
        self.seen.append((ids.tolist(), self.trainer.strategy.in_ghost_step))
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True, batch_size=len(x))

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return batch[2]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SummedRegression(Regression):
    """``num_items`` mode: the step returns the summed loss; the Trainer divides by the global item count."""

    def num_items(self, batch: Any) -> int:
        return len(batch[0])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, ids = batch
        self.seen.append((ids.tolist(), self.trainer.strategy.in_ghost_step))
        return torch.nn.functional.mse_loss(self(x), y, reduction="sum")


class ManualRegression(Regression):
    """Manual optimization: backward and step inside training_step."""

    automatic_optimization = False
    clip: float | None = None  # clipped by hand, as manual optimization requires (Lightning's rule)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        x, y, _ = batch
        optimizer.zero_grad()
        self.manual_backward(torch.nn.functional.mse_loss(self(x), y))
        if self.clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        optimizer.step()


def dataset(num_samples: int, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(num_samples, FEATURES, generator=g), torch.randn(num_samples, 1, generator=g),
                         torch.arange(num_samples))


def loader(num_samples: int, batch_size: int, **kwargs: Any) -> DataLoader:
    return DataLoader(dataset(num_samples), batch_size=batch_size, **kwargs)


def trainer(**kwargs: Any) -> Trainer:
    defaults = dict(devices=2, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return Trainer(**{**defaults, **kwargs})


def reference_sgd(module: torch.nn.Module, batches: list[list[list[int]]], lr: float = 0.1,
                  data: TensorDataset | None = None, clip: float | None = None) -> dict[str, torch.Tensor]:
    """Plain SGD where step ``i`` uses the mean over groups of each group's mean-loss gradient.

    ``batches[i]`` lists sample-id groups: one group per rank batch (groups of a step are averaged like
    DDP does), or a single group for a one-process big batch.
    """
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    for groups in batches:
        optimizer.zero_grad()
        for ids in groups:
            x, y, _ = data[ids]
            (torch.nn.functional.mse_loss(module(x), y) / len(groups)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for key in expected:
        torch.testing.assert_close(actual[key].detach().cpu(), expected[key], atol=tol, rtol=tol, msg=key)
