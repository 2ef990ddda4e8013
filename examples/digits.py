"""Train a small CNN on scikit-learn's bundled 8x8 handwritten digits (no download needed).

Run from the repository root with `nox -s demo` or `python examples/digits.py`. Checkpoints and
TensorBoard logs land under `runs/`; the script exits non-zero if validation accuracy < 0.95.

The same model and data through the config-driven CLI (the `kiln[cli]` extra):
`python examples/digits.py fit --trainer.max_epochs=3` (also `validate`/`test`/`predict`, `--config`,
`--print_config`, `--model.lr=1e-3`, `--optimizer=SGD`, `--ckpt_path last`).
"""

from __future__ import annotations

import argparse
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from callbacks import ModelCheckpoint
from framework import DataModule, Trainer, TrainModule, seed_everything

NUM_CLASSES = 10
MIN_ACCURACY = 0.95


class DigitsCNN(TrainModule):
    """Two 3x3 convolutions, one pooling, one hidden dense layer: ~40k parameters."""

    def __init__(self, epochs: int | None = None, lr: float = 3e-3) -> None:
        super().__init__()
        self.epochs = epochs  # the cosine schedule's length; None: the Trainer's max_epochs
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))
        self.val_acc.update(logits, labels)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)
        epochs = self.epochs or max(self.trainer.max_epochs or 1, 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def digits_loaders(batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """An 80/20 train/validation split of the 1,797 digits, pixels scaled to [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = len(labels) // 5
    val_idx, train_idx = order[:n_val], order[n_val:]
    train = DataLoader(TensorDataset(images[train_idx], labels[train_idx]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(images[val_idx], labels[val_idx]), batch_size=256)
    return train, val


class DigitsData(DataModule):
    """The digits split as a DataModule, so the CLI can build it from `--data.batch_size` / `--data.seed`."""

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        self.train_loader, self.val_loader = digits_loaders(self.batch_size, self.seed)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader

    def val_dataloader(self) -> DataLoader:
        return self.val_loader

    def test_dataloader(self) -> DataLoader:
        return self.val_loader

    def predict_dataloader(self) -> DataLoader:
        return self.val_loader


def cli_main(argv: list[str]) -> int:
    """`python examples/digits.py fit|validate|test|predict [--config ...] [--trainer.* / --model.* ...]`."""
    from framework.cli import LightningCLI

    torch.set_num_threads(1)
    LightningCLI(DigitsCNN, DigitsData, args=argv, seed_everything_default=0, trainer_defaults={
        "max_epochs": 15, "default_root_dir": "runs", "log_every_n_steps": 10,
        "callbacks": [ModelCheckpoint(monitor="val_acc", mode="max", save_top_k=1, save_last=True)]})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("fit", "validate", "test", "predict"):
        return cli_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--root", default="runs", help="where checkpoints and TensorBoard logs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; a model this small gains nothing from more, and loses a lot "
                             "when other processes compete for the cores")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)

    seed_everything(args.seed)
    train_loader, val_loader = digits_loaders(args.batch_size, args.seed)
    model = DigitsCNN(epochs=args.epochs)

    trainer = Trainer(
        max_epochs=args.epochs,
        default_root_dir=args.root,
        callbacks=[ModelCheckpoint(monitor="val_acc", mode="max", save_top_k=1)],
        log_every_n_steps=10,
    )
    trainer.fit(model, train_loader, val_loader)
    accuracy = float(trainer.validate(model, val_loader)[0]["val_acc"])

    checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None) or f"{trainer.default_root_dir}/checkpoints"
    print(f"\nFinal validation accuracy: {accuracy:.4f} ({len(val_loader.dataset)} held-out digits)")
    logs = getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir
    print(f"TensorBoard logs: {logs}  (view with: tensorboard --logdir {trainer.default_root_dir})")
    print(f"Checkpoints:      {checkpoints}  (resume with trainer.fit(..., ckpt_path='last'))")
    if accuracy < MIN_ACCURACY:
        print(f"FAILED: validation accuracy {accuracy:.4f} is below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
