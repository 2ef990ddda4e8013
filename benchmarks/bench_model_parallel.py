"""Per-rank parameter + optimizer memory: a 2 x 2 ModelParallelStrategy mesh (FSDP2 x TP) vs DDP, 4 CPU processes.

The same stack of pre-norm MLP blocks (``--width`` d, 4d hidden, ``--blocks`` of them, plus a head) is
trained a few AdamW steps under ``Trainer(strategy="ddp", devices=4)`` and under
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)`` (w1 column-wise, w2 row-wise,
FSDP2 over data_parallel applied by Kiln). Per rank, the bytes of parameters and optimizer state the
rank holds are counted (a DTensor counts its local shard). The two runs see the same global batches,
so the model-parallel run's full weights must equal DDP's up to AdamW's amplification of float
reassociation (an Adam step moves a parameter by up to lr whatever the gradient's size, so gradients
near zero that differ in the last bits can differ by ~lr after a step: tolerance ``LR``, while a wrong
sharding is off by orders more; the script exits 1 otherwise).

    python benchmarks/bench_model_parallel.py [--width 256] [--blocks 4] [--steps 3] [--json]

Target (DESIGN.md §6): model-parallel per-rank parameter + optimizer memory ≈ 0.25 × DDP's (≤ 0.27:
LayerNorm weights and row-parallel biases are sharded over data_parallel only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from typing import Any

import torch
from common import REPO_ROOT, emit, format_table, machine_info
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

TARGET = 0.27
WORLD = 4
LR = 1e-3


def build(width: int, blocks: int, tensor_parallel: bool) -> Any:
    from framework import TrainModule

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.w1, self.w2 = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.w2(F.gelu(self.w1(self.norm(x))))

    class Net(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))
            self.head = nn.Linear(width, 1)

        def configure_model(self) -> None:
            if tensor_parallel:
                from torch.distributed.tensor.parallel import (
                    ColwiseParallel,
                    RowwiseParallel,
                    parallelize_module,
                )

                for block in self.blocks:
                    parallelize_module(block, self.device_mesh["tensor_parallel"],
                                       {"w1": ColwiseParallel(), "w2": RowwiseParallel()})

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            for block in self.blocks:
                x = block(x)
            return F.mse_loss(self.head(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=LR)

    return Net()


def held_bytes(tensors: Any) -> int:
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in local)


def run(strategy: Any, args: argparse.Namespace, tensor_parallel: bool, root: str) -> dict[str, Any]:
    from framework import Trainer

    g = torch.Generator().manual_seed(1)
    # DDP: 4 replicas x 4 samples; 2 x 2 mesh: 2 data-parallel replicas x 8 samples — the same 16 per step
    data = TensorDataset(torch.randn(16 * args.steps, args.width, generator=g), torch.randn(16 * args.steps, 1, generator=g))
    module = build(args.width, args.blocks, tensor_parallel)
    trainer = Trainer(strategy=strategy, devices=WORLD, max_steps=args.steps, enable_checkpointing=False, logger=False,
                      enable_progress_bar=False, default_root_dir=root)
    trainer.fit(module, DataLoader(data, batch_size=8 if tensor_parallel else 4))
    state = [v for s in trainer.optimizers[0].state.values() for v in s.values()]
    full = trainer.strategy.module_state_dict()
    return {"param_bytes": held_bytes(module.parameters()), "optimizer_bytes": held_bytes(state),
            "full_param_bytes": sum(v.numel() * v.element_size() for v in full.values()),
            "weights": torch.cat([v.reshape(-1).float() for _, v in sorted(full.items())])}


def worker(args: argparse.Namespace, out_file: str) -> None:
    from strategies import DDPStrategy, ModelParallelStrategy

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings(), \
            open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        ddp = run(DDPStrategy(), args, False, root)
        mp = run(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2), args, True, root)
    import torch.distributed as dist

    diff = float((mp.pop("weights") - ddp.pop("weights")).abs().max())
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, {"ddp": ddp, "model_parallel": mp})
    if dist.get_rank() == 0:
        with open(out_file, "w") as f:
            json.dump({"by_rank": gathered, "weight_diff": diff}, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="2 x 2 model-parallel vs DDP per-rank memory (4 CPU processes).")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--quick", action="store_true", help="a narrow model: proves the script works")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.blocks, args.steps = 32, 2, 1
    if args.worker:
        worker(args, args.worker)
        return 0
    from framework.testing import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.json")
        run_distributed(os.path.abspath(__file__), WORLD, timeout=args.timeout, stream=False,
                        args=["--width", args.width, "--blocks", args.blocks, "--steps", args.steps, "--worker", out_file],
                        env={"PYTHONPATH": os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH"))))})
        with open(out_file) as f:
            raw = json.load(f)
    per_rank = {name: max(r[name]["param_bytes"] + r[name]["optimizer_bytes"] for r in raw["by_rank"])
                for name in ("ddp", "model_parallel")}
    ratio = per_rank["model_parallel"] / per_rank["ddp"]
    match = raw["weight_diff"] <= LR
    result = {
        "benchmark": "model_parallel", "world_size": WORLD, "mesh": [2, 2], "width": args.width, "blocks": args.blocks,
        "steps": args.steps, "memory_by_rank": raw["by_rank"], "weight_diff": raw["weight_diff"], "weights_match": match,
        "checks": [{"name": "2x2 mesh memory per rank (params + optimizer)", "measured": "kiln model_parallel 2x2",
                    "baseline": "kiln ddp", "measured_bytes": per_rank["model_parallel"],
                    "baseline_bytes": per_rank["ddp"], "ratio": ratio, "target": TARGET,
                    "passed": ratio <= TARGET and match}],
        "machine": machine_info(),
    }
    table = format_table(["rank", "strategy", "params B", "optimizer B"], [
        [rank, name, r[name]["param_bytes"], r[name]["optimizer_bytes"]]
        for rank, r in enumerate(raw["by_rank"]) for name in ("ddp", "model_parallel")])
    table += (f"\n\nlargest rank, model_parallel 2x2 / ddp: {ratio:.3f} (target ≤ {TARGET}); full weights == DDP's: "
              f"{match} (max Δ {raw['weight_diff']:.1e})")
    emit(result, args.json, table)
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
