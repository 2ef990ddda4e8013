"""Resume cost vs position in the epoch: a checkpoint at batch 10 must resume as fast as one at 10,000.

One training run (tiny MLP, 1 thread, shuffled map-style data) saves a checkpoint after batch
``--near`` and after batch ``--far`` of its first epoch, and records the batch it trained next and its
weights there. Each measurement is a fresh Trainer and module running ``fit(ckpt_path=...)``; the clock
runs from the ``fit`` call to the start of the first training step. Kiln positions its resumable
sampler directly (no batch is loaded twice), so the two times must be equal: target far / near ≤ 1.10
(median of per-round ratios). Each resumed run is checked: its first batch has index ``--far``
(resp. ``--near``), is the very batch the original run trained there, and the restored weights equal
the saved ones.

For contrast, the same checkpoints are resumed with a loader whose custom batch sampler cannot be
positioned, which Kiln can only replay (it warns): that cost grows with the position, so the
benchmark would show a replaying resume. Its first batch is checked against the batch at that
position of its own (sequential) order.

    python benchmarks/bench_resume.py [--near 10] [--far 10000] [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
from common import emit, format_table, interleaved, machine_info, median, paired_ratio
from torch import nn
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

TARGET_RATIO = 1.10
BATCH, FEATURES = 4, 16


class Mismatch(AssertionError):
    pass


class CustomBatches(BatchSampler):
    """A batch sampler Kiln cannot position (not the stock BatchSampler): resuming replays batches."""


def make_dataset(batches: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = batches * BATCH
    return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, 4, (n,), generator=g))


def kiln_module() -> type:
    from framework import TrainModule

    class Net(TrainModule):
        def __init__(self, record: set[int] | None = None) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 4))
            self.record = record or set()
            self.recorded: dict[int, torch.Tensor] = {}
            self.first: tuple[float, int, torch.Tensor, torch.Tensor] | None = None

        def training_step(self, batch, batch_idx):
            if self.first is None:
                started = time.perf_counter()
                self.first = (started, batch_idx, batch[0].clone(), _flat(self))  # weights before this step
            if batch_idx in self.record:
                self.recorded[batch_idx] = batch[0].clone()
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    return Net


def trainer(root: str, max_steps: int, callbacks: list | None = None) -> Any:
    from framework import Trainer

    return Trainer(enable_model_summary=False, max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   default_root_dir=root, callbacks=callbacks)


def reset_kiln() -> None:
    from framework import DistributedState

    DistributedState._reset_state()


def save_checkpoints(root: str, dataset: TensorDataset, positions: list[int]) -> dict[int, dict[str, Any]]:
    """Train once to the last position, saving a checkpoint after each position; what each must resume to."""
    from callbacks import Callback

    Net = kiln_module()
    saved: dict[int, dict[str, Any]] = {}

    class SaveAt(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step in positions:
                path = os.path.join(root, f"at-{trainer.global_step}")
                trainer.save_checkpoint(path)
                saved[trainer.global_step] = {"path": path, "weights": _flat(module)}

    module = Net(record=set(positions))
    trainer(os.path.join(root, "run"), max_steps=max(positions) + 1, callbacks=[SaveAt()]).fit(
        module, DataLoader(dataset, batch_size=BATCH, shuffle=True))
    reset_kiln()
    for position in positions:
        saved[position]["next_batch"] = module.recorded[position]
    return saved


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def resume(root: str, dataset: TensorDataset, saved: dict[str, Any], position: int, replay: bool) -> float:
    """Seconds from ``fit(ckpt_path=...)`` to the first training step; checks position, batch and weights."""
    Net = kiln_module()
    if replay:
        loader = DataLoader(dataset, batch_sampler=CustomBatches(SequentialSampler(dataset), BATCH, False))
        expected = dataset[position * BATCH:(position + 1) * BATCH][0]
    else:
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
        expected = saved["next_batch"]
    module = Net()
    gc.collect()
    t0 = time.perf_counter()
    trainer(os.path.join(root, "resume"), max_steps=position + 1).fit(module, loader, ckpt_path=saved["path"])
    reset_kiln()
    if module.first is None:
        raise Mismatch(f"resume at {position}: no training step ran")
    started, batch_idx, batch, weights = module.first
    who = f"{'replaying' if replay else 'kiln'} resume at batch {position}"
    if batch_idx != position:
        raise Mismatch(f"{who}: the first step got batch_idx {batch_idx}")
    if not torch.equal(batch, expected):
        raise Mismatch(f"{who}: the first batch differs from the one an uninterrupted run trains there")
    if not torch.equal(weights, saved["weights"]):
        raise Mismatch(f"{who}: the restored weights differ from the saved ones")
    return started - t0


def run(args: argparse.Namespace, root: str) -> dict[str, Any]:
    positions = [args.near, args.far]
    dataset = make_dataset(args.far + 16)
    with _quiet():
        saved = save_checkpoints(root, dataset, positions)
        runners = {f"{kind} @{p}": (lambda p=p, replay=kind == "replaying": resume(root, dataset, saved[p], p, replay))
                   for kind in ("kiln", "replaying") for p in positions}
        if args.no_replay:
            runners = {k: v for k, v in runners.items() if k.startswith("kiln")}
        runners[f"kiln @{args.near}"]()  # warm-up: lazy imports and first-time set-up are not a resume cost
        runs = interleaved(runners, args.repeats)
    near, far = f"kiln @{args.near}", f"kiln @{args.far}"
    ratio = paired_ratio(runs[far], runs[near])
    checks = [{"name": "resume cost flat in position", "measured": far, "baseline": near,
               "measured_s": median(runs[far]), "baseline_s": median(runs[near]), "ratio": ratio,
               "target": TARGET_RATIO, "passed": ratio <= TARGET_RATIO}]
    result = {"benchmark": "resume", "positions": positions, "repeats": args.repeats, "threads": 1,
              "batch_size": BATCH, "median_s": {k: median(v) for k, v in runs.items()}, "runs_s": runs,
              "checks": checks, "resumed_batches_match": True}
    if not args.no_replay:
        result["replay_ratio"] = paired_ratio(runs[f"replaying @{args.far}"], runs[f"replaying @{args.near}"])
    return result


@contextlib.contextmanager
def _quiet():
    logging.getLogger("framework").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the replaying loader's warning is expected
        yield


def table(result: dict[str, Any]) -> str:
    rows = [(name, 1e3 * value, f"{min(result['runs_s'][name]) * 1e3:.1f}") for name, value in result["median_s"].items()]
    check = result["checks"][0]
    text = format_table(["resume: loader @ batch", "fit → first step, median ms", "min ms"], rows)
    text += (f"\n\nKiln far / near = {check['ratio']:.3f} (target ≤ {check['target']}: "
             f"{'met' if check['passed'] else 'MISSED'})")
    if "replay_ratio" in result:
        text += f"; a replaying loader: {result['replay_ratio']:.2f}"
    return text + (f"\nMedian of {result['repeats']} interleaved rounds, 1 thread, batch size {result['batch_size']}; "
                   "every resume started at the right batch with the right data and weights.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Resume cost at an early vs a late batch of an epoch.")
    parser.add_argument("--near", type=int, default=10, help="early checkpoint position (batches into the epoch)")
    parser.add_argument("--far", type=int, default=10_000, help="late checkpoint position")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median taken)")
    parser.add_argument("--no-replay", action="store_true", help="leave out the replaying-loader contrast")
    parser.add_argument("--quick", action="store_true", help="positions 10 and 50, 1 round: proves the script works")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.far, args.repeats = 50, 1
    if not 1 <= args.near < args.far:
        parser.error(f"need 1 ≤ --near < --far, got --near {args.near} --far {args.far}")
    if args.repeats < 1:
        parser.error(f"--repeats must be ≥ 1, got {args.repeats}")
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="kiln-bench-resume-")
    try:
        result = run(args, root)
    except Mismatch as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["machine"] = machine_info()
    emit(result, args.json, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
