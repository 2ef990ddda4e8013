"""What nan_policy="skip" costs per optimizer step over "ignore" (the loss flag, the fused gradient pass and the one
host read), on a CPU MLP. Interleaved rounds; medians of the per-step time.

    python benchmarks/bench_nan_policy.py [--rounds 7] [--steps 60] [--width 1024]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from callbacks import Callback  # noqa: E402
from framework import Trainer, TrainModule  # noqa: E402


class MLP(TrainModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                       torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


class StepClock(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.times.append(time.perf_counter())


def per_step(policy: str, steps: int, width: int) -> float:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(steps * 16, width), torch.randn(steps * 16, 1))
    clock = StepClock()
    Trainer(max_steps=steps, nan_policy=policy, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            callbacks=[clock]).fit(MLP(width), DataLoader(data, batch_size=16))
    gaps = [b - a for a, b in zip(clock.times[5:], clock.times[6:])]  # after warm-up
    return statistics.median(gaps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--width", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[float]] = {"ignore": [], "skip": []}
    for _ in range(args.rounds):
        for policy in results:
            results[policy].append(per_step(policy, args.steps, args.width))
    ignore, skip = (statistics.median(results[k]) * 1e3 for k in ("ignore", "skip"))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    params = 2 * args.width * args.width + 3 * args.width + 1
    print(f"CPU: {cpu}; torch {torch.__version__}; 1 thread; MLP {params / 1e6:.1f}M params, batch 16")
    print(f"nan_policy='ignore': {ignore:.2f} ms/step, 'skip': {skip:.2f} ms/step, ratio {skip / ignore:.3f} "
          f"(median of {args.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
