"""A checkpointing DDP/FSDP run for torchrun, with faults that fire once each across restarts.

Run by tests/test_elastic.py as ``torchrun --nproc-per-node=2 --max-restarts=2 tests/scripts/elastic_run.py
--root DIR --out final.safetensors``, and by the real-process Ctrl-C tests in tests/test_preemption_ctrl_c.py (also as a
plain script: Kiln's launcher starts rank 1).
The model, data and dropout come from ``resumable_run.py``. Nothing here names a checkpoint: a restarted attempt
resumes through ``Trainer(resume="auto")``.

``--faults sigkill:1:7,raise:0:11`` makes rank 1 SIGKILL itself once the global step reaches 7, then (in the
next attempt) rank 0 raise at step 11; a fault fires once (a marker file under ``--root`` records it). Every rank
prints ``TOPOLOGY rank=R local_rank=L node_rank=N world=W restart=C`` at the start of fit, ``SEEN rank=R
ids=...`` with the sample ids of its first epoch, and ``rank R step S`` after each batch (``--progress``). Rank 0
writes the final full weights to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import resumable_run as base  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from callbacks import Callback, ModelCheckpoint  # noqa: E402
from framework import Trainer, TrainModule, seed_everything  # noqa: E402


class IndexedWithIds(base.IndexedDataset):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = super().__getitem__(index)
        return x, y, index


class Net(base.DropoutNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, ids = batch
        if self.trainer.current_epoch == 0:
            self.seen.extend(ids.tolist())
        return super().training_step((x, y), batch_idx)


class Faults(Callback):
    """Fires each ``(kind, rank, step)`` once, in order, across restarts; prints topology and progress."""

    def __init__(self, root: str, faults: list[tuple[str, int, int]], progress: bool, slow: float) -> None:
        self.root, self.faults, self.progress, self.slow = root, faults, progress, slow

    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        env = os.environ
        print(f"TOPOLOGY rank={trainer.global_rank} local_rank={trainer.local_rank} node_rank="
              f"{env.get('GROUP_RANK', '-')} world={trainer.world_size} restart="
              f"{env.get('TORCHELASTIC_RESTART_COUNT', '-')}", flush=True)

    def on_train_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int) -> None:
        for i, (kind, rank, step) in enumerate(self.faults):
            marker = os.path.join(self.root, f"fault-{i}.done")
            if os.path.exists(marker):
                continue
            if trainer.global_rank == rank and trainer.global_step >= step:
                open(marker, "w").close()
                print(f"rank {rank} injecting {kind} at step {trainer.global_step}", flush=True)
                if kind == "raise":
                    raise RuntimeError(f"injected failure on rank {rank} at step {trainer.global_step}")
                os.kill(os.getpid(), signal.SIGKILL)
            return  # later faults wait for this one

    def on_train_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.progress:
            print(f"rank {trainer.global_rank} step {trainer.global_step}", flush=True)
        if self.slow:
            time.sleep(self.slow)

    def on_train_epoch_end(self, trainer: Trainer, module: TrainModule) -> None:
        if trainer.current_epoch == 0 and module.seen:
            print(f"SEEN rank={trainer.global_rank} ids={sorted(module.seen)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp", "auto"))
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--max-epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--every-n-steps", type=int, default=3)
    p.add_argument("--faults", default="")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--slow", type=float, default=0.0, help="seconds to sleep after each batch")
    args = p.parse_args(argv)
    faults = [(kind, int(rank), int(step)) for kind, rank, step in
              (item.split(":") for item in args.faults.split(",") if item)]

    torch.set_num_threads(1)
    seed_everything(7)
    module = Net(16)
    module.seen = []
    loader = DataLoader(IndexedWithIds(args.samples), batch_size=args.batch_size, shuffle=True)
    callbacks = [Faults(args.root, faults, args.progress, args.slow),
                 ModelCheckpoint(dirpath=os.path.join(args.root, "checkpoints"), every_n_train_steps=args.every_n_steps,
                                 every_n_epochs=None, total_limit=2)]
    trainer = Trainer(default_root_dir=args.root, max_epochs=args.max_epochs, devices=args.devices,
                      num_nodes=args.num_nodes, strategy=args.strategy, callbacks=callbacks, logger=False,
                      enable_progress_bar=False)
    try:
        trainer.fit(module, loader, ckpt_path=args.ckpt)  # resume="auto" (the default) resumes a restarted attempt
    except SystemExit as exc:  # Ctrl-C / preemption: every rank says how it ends
        print(f"rank {trainer.global_rank} exits with {exc.code}", flush=True)
        raise

    weights = {k: v.detach().clone().contiguous() for k, v in trainer.strategy.module_state_dict().items()}
    if trainer.is_global_zero:
        from safetensors.torch import save_file

        weights["global_step"] = torch.tensor(trainer.global_step)
        save_file(weights, args.out)
    print(f"rank {trainer.global_rank} done", flush=True)


if __name__ == "__main__":
    main()
