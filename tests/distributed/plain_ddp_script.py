"""A plain training script: `python plain_ddp_script.py [--fail-rank R]` trains on 2 ranks by itself.

Kiln's launcher re-runs this file for rank 1. Each rank prints one RESULT line; with ``--fail-rank R``
rank R raises in its second training step, to check that the job ends promptly with that error.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import Regression, loader, trainer  # noqa: E402

from framework import DistributedState  # noqa: E402


class MaybeFailing(Regression):
    def __init__(self, fail_rank: int) -> None:
        super().__init__()
        self.fail_rank = fail_rank

    def training_step(self, batch, batch_idx):
        if batch_idx == 1 and self.trainer.global_rank == self.fail_rank:
            raise RuntimeError(f"boom from rank {self.fail_rank}")
        return super().training_step(batch, batch_idx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int, default=-1)
    args = parser.parse_args()
    module = MaybeFailing(args.fail_rank)
    t = trainer(strategy="ddp", devices=2, max_epochs=2)
    t.fit(module, loader(16, 2))
    state = DistributedState()
    total = sum(p.detach().double().sum().item() for p in module.parameters())
    line = (f"RESULT rank={state.process_index} world={state.num_processes} local={state.local_process_index} "
            f"launcher={os.environ.get('KILN_LAUNCHER_PID') is not None} step={t.global_step} params={total:.10f}\n")
    os.write(1, line.encode())  # one write(2): the ranks share this pipe, and lines must not interleave
    assert torch.distributed.get_world_size() == 2


if __name__ == "__main__":
    main()
