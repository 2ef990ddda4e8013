"""A small training run that checkpoints and resumes; run as a script by the resume and crash tests.

Everything that can break exact resume is on: shuffling, dropout, dataloader workers, AMP, Adam and
two LR schedulers (one per step, one per epoch), optionally gradient accumulation. Dataset items
depend only on their index, so worker processes draw no random numbers that matter.

    python tests/scripts/resumable_run.py --root DIR --out final.safetensors [--ckpt PATH|last] ...

At the end the final training state (weights, Adam moments, LR, scaler scale, step) is written to
``--out`` as one safetensors file, which the tests compare with ``torch.equal``. With ``--progress``
the global step is printed after every batch, so a test can kill the process at a chosen step.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, ROOT)

from callbacks import Callback, ModelCheckpoint  # noqa: E402
from framework import Trainer, TrainModule, seed_everything  # noqa: E402

FEATURES = 8


class IndexedDataset(Dataset):
    """Item ``i`` is a pure function of ``i``; counts ``__getitem__`` calls made in this process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.calls = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        g = torch.Generator().manual_seed(1000 + int(index))
        x = torch.randn(FEATURES, generator=g)
        return x, x.sum(0, keepdim=True).tanh()


class DropoutNet(TrainModule):
    """MLP with dropout, Adam, a per-step StepLR and a per-epoch ExponentialLR."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(hidden, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        per_step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.8)
        per_epoch = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
        return [optimizer], [{"scheduler": per_step, "interval": "step"}, per_epoch]


class Progress(Callback):
    """Prints ``step <n>`` after every batch, before that step's checkpoint is saved (it comes first)."""

    def on_train_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        print(f"step {trainer.global_step}", flush=True)


def final_state(trainer: Trainer, module: TrainModule) -> dict[str, torch.Tensor]:
    """Everything a continued run depends on, as named tensors."""
    state = {f"model.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    optimizer = trainer.optimizers[0]
    for i, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            state[f"adam.{i}.{key}"] = torch.as_tensor(value).clone()
    state["lr"] = torch.tensor(optimizer.param_groups[0]["lr"], dtype=torch.float64)
    scaler = trainer.precision_plugin.scaler
    if scaler is not None:
        state["scale"] = torch.as_tensor(scaler.get_scale(), dtype=torch.float64)
    state["global_step"] = torch.tensor(trainer.global_step)
    state["skipped_steps"] = torch.tensor(trainer.skipped_steps)
    return state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="16-mixed")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--every-n-steps", type=int, default=3)
    p.add_argument("--total-limit", type=int, default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--count-file", default=None, help="write the number of __getitem__ calls (num_workers=0)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    seed_everything(7)
    module = DropoutNet(args.hidden)
    dataset = IndexedDataset(args.samples)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    callbacks: list[Callback] = [Progress()] if args.progress else []
    # Every N steps, keeping all (save_top_k=-1) unless --total-limit; without a limit also every epoch end
    # (a Lightning ModelCheckpoint has one schedule, so that is a second callback on the same folder).
    callbacks.append(ModelCheckpoint(every_n_train_steps=args.every_n_steps, save_top_k=-1,
                                     total_limit=args.total_limit, async_save=args.async_save))
    if args.total_limit is None:
        callbacks.append(ModelCheckpoint(every_n_epochs=1, save_top_k=-1))
    trainer = Trainer(default_root_dir=args.root, max_epochs=args.max_epochs, max_steps=args.max_steps,
                      precision=args.precision, accumulate_grad_batches=args.accumulate, callbacks=callbacks,
                      logger=False, enable_progress_bar=False)
    trainer.fit(module, loader, ckpt_path=args.ckpt)

    from safetensors.torch import save_file

    save_file(final_state(trainer, module), args.out)
    if args.count_file:
        with open(args.count_file, "w") as f:
            f.write(str(dataset.calls))


if __name__ == "__main__":
    main()
