"""A checkpointing training run on 1 to 3 processes, with faults injected on request.

Run as a plain script by tests/test_fault_injection.py and tests/test_distributed_faults.py; with
``--devices N`` Kiln's launcher re-runs it for ranks 1..N-1. The model, data and final-state dump come from
``resumable_run.py`` (shuffling, dropout, Adam, per-step and per-epoch LR schedulers).

    python tests/scripts/fault_run.py --root DIR --out final.safetensors [--devices N] [--ckpt last]
        [--fault KIND --fault-rank R --fault-step S]

Every rank prints ``rank R pid P`` at start and ``rank R step N`` after each batch. Faults (on rank R, once
``global_step >= S``): ``raise`` (RuntimeError in the step), ``sigkill`` (the rank kills itself), ``hang``
(sleeps; pair it with ``--timeout``), and SIGKILL at a point of the next checkpoint save: ``kill-in-write``
(half of a state file written), ``kill-before-manifest``, ``kill-before-rename`` (the commit), or of the
rotation after it: ``kill-in-rotation`` (one file of an old checkpoint deleted, the others not yet).
Rank 0 writes the final state to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from datetime import timedelta
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import resumable_run as base  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from callbacks import Callback, ModelCheckpoint  # noqa: E402
from framework import Trainer, TrainModule, seed_everything  # noqa: E402

SAVE_FAULTS = ("kill-in-write", "kill-before-manifest", "kill-before-rename", "kill-in-rotation")
STEP_FAULTS = ("raise", "sigkill", "hang")


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Faults(Callback):
    """Prints progress; injects the requested fault on this rank once ``global_step`` reaches ``step``."""

    def __init__(self, kind: str | None, rank: int, step: int) -> None:
        self.kind, self.rank, self.step = kind, rank, step
        self.armed = False

    def on_train_batch_start(self, trainer: Trainer, module: TrainModule, batch: Any, batch_idx: int) -> None:
        if self.kind in STEP_FAULTS and trainer.global_rank == self.rank and trainer.global_step >= self.step:
            print(f"rank {trainer.global_rank} injecting {self.kind} at step {trainer.global_step}", flush=True)
            if self.kind == "raise":
                raise RuntimeError(f"injected failure on rank {self.rank} at step {trainer.global_step}")
            if self.kind == "sigkill":
                die()
            time.sleep(3600)

    def on_train_batch_end(self, trainer: Trainer, module: TrainModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        print(f"rank {trainer.global_rank} step {trainer.global_step}", flush=True)
        if self.kind in SAVE_FAULTS and trainer.global_rank == self.rank and trainer.global_step >= self.step:
            if not self.armed:
                self.armed = True
                arm(self.kind)


def arm(kind: str) -> None:
    """Patch the checkpoint IO so that the next save (or rotation) kills this process at the chosen point."""
    from framework import checkpoint
    from framework.checkpoint import save as checkpoint_save
    from framework.checkpoint import tensor_files
    from framework.checkpoint.storage import Location

    if kind == "kill-in-write":
        real_write = tensor_files.write_safetensors

        def write_half(loc: Any, tensors: dict, **kwargs: Any) -> Any:
            from safetensors.torch import save

            data = save(tensors)  # the bytes the library would write; half of them reach the file
            with loc.open("wb") as f:
                f.write(data[: max(len(data) // 2, 65)])
                f.flush()
                die()
            return real_write(loc, tensors, **kwargs)

        tensor_files.write_safetensors = write_half
    elif kind == "kill-before-manifest":
        real_file = checkpoint_save.write_file

        def write_file(loc: Any, write: Any, fsync: bool = False) -> Any:
            if loc.name == checkpoint.MANIFEST:
                die()
            return real_file(loc, write, fsync)

        checkpoint_save.write_file = write_file
    elif kind == "kill-before-rename":
        Location.replace_with = lambda self, staging, token, fsync=False: die()
    elif kind == "kill-in-rotation":  # die right after the first file of a deletion goes, whichever it is
        real_remove_file = Location.remove_file

        def remove_file(self: Location, missing_ok: bool = False) -> None:
            real_remove_file(self, missing_ok)
            if self.name == checkpoint.MANIFEST:
                die()

        def remove_tree(self: Location) -> None:
            first = next(iter(sorted(self.file_sizes())), None)
            if first is not None:
                real_remove_file(self.join(first))
            die()

        Location.remove_file, Location.remove_tree = remove_file, remove_tree


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--max-epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--every-n-steps", type=int, default=2)
    p.add_argument("--total-limit", type=int, default=2)
    p.add_argument("--fault", choices=(*STEP_FAULTS, *SAVE_FAULTS), default=None)
    p.add_argument("--fault-rank", type=int, default=0)
    p.add_argument("--fault-step", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="collective timeout in seconds (DDP)")
    p.add_argument("--preempt-every", type=int, default=None, help="ranks compare preemption notes every N steps")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    seed_everything(7)
    module = base.DropoutNet(args.hidden)
    loader = DataLoader(base.IndexedDataset(args.samples), batch_size=args.batch_size, shuffle=True)
    strategy: Any = "auto"
    if args.devices > 1:
        from strategies import DDPStrategy

        timeout = timedelta(seconds=args.timeout) if args.timeout else timedelta(minutes=30)
        strategy = DDPStrategy(timeout=timeout)
    callbacks = [Faults(args.fault, args.fault_rank, args.fault_step),
                 ModelCheckpoint(every_n_train_steps=args.every_n_steps, save_top_k=-1, total_limit=args.total_limit)]
    if args.preempt_every:
        from callbacks.preemption import PreemptionHandler

        callbacks.append(PreemptionHandler(check_every_n_steps=args.preempt_every))
    trainer = Trainer(default_root_dir=args.root, max_epochs=args.max_epochs, devices=args.devices,
                      strategy=strategy, callbacks=callbacks, logger=False, enable_progress_bar=False)
    print(f"rank {trainer.global_rank if args.devices == 1 else os.environ.get('RANK', 0)} pid {os.getpid()}",
          flush=True)
    trainer.fit(module, loader, ckpt_path=args.ckpt)

    if trainer.is_global_zero:
        from safetensors.torch import save_file

        save_file(base.final_state(trainer, module), args.out)
    print(f"rank {trainer.global_rank} done", flush=True)


if __name__ == "__main__":
    main()
