"""A compiled training step on a transformer block: ``Trainer(compile=...)`` vs a raw ``torch.compile`` loop.

Both contenders train the same small transformer encoder block (+ linear head) from the same weights on
the same pre-made batches, 1 thread, with the same compiler settings: the raw loop compiles the model
(``torch.compile(model)``), Kiln compiles the module's ``forward`` through ``Trainer(compile=...)``. The
clock reads steady state only — from the start of step ``warmup`` (compilation happens in the first
steps) to the start of step ``warmup + steps`` — per round; contenders run interleaved, rotating the
order, and the ratio is the median of per-round ratios. Each round's final weights must match the raw
loop's (the script exits 1 otherwise), so a fast wrong path cannot win.

    python benchmarks/bench_compile.py [--steps 200] [--warmup 20] [--repeats 5] [--backend inductor] [--json]

Target (DESIGN.md §6): Kiln compiled step / raw compiled step ≤ 1.05.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import warnings

import torch
from bench_overhead import Clock, Config, PreBatched, flat_weights, make_loader, make_model
from common import emit, format_table, interleaved, machine_info, median, paired_ratio
from torch.nn import functional as F

TARGET = 1.05
LR, MOMENTUM = 0.01, 0.9


def run_raw(cfg: Config, data: PreBatched, options: dict) -> tuple[tuple[float, float], torch.Tensor]:
    model, clock = make_model("transformer"), Clock(cfg)
    compiled = torch.compile(model, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    model.train()
    for i, (x, y) in enumerate(make_loader(data)):
        clock.tick(i)
        loss = F.cross_entropy(compiled(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return clock.per_step(), flat_weights(model)


def run_kiln(cfg: Config, data: PreBatched, options: dict, root: str) -> tuple[tuple[float, float], torch.Tensor]:
    from framework import DistributedState, Trainer, TrainModule

    class Block(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model("transformer")
            self.clock = Clock(cfg)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            self.clock.tick(batch_idx)
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM)

    module = Block()
    trainer = Trainer(max_steps=cfg.total_steps, enable_checkpointing=False, default_root_dir=root, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, compile=options)
    trainer.fit(module, make_loader(data))
    DistributedState._reset_state()
    return module.clock.per_step(), flat_weights(module.net)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no codegen, fast)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    cfg = Config("transformer", args.steps, args.warmup, log_every_n_steps=50)
    data = PreBatched("transformer", cfg.total_steps)
    options = {"backend": args.backend}
    with tempfile.TemporaryDirectory() as root, open(os.devnull, "w") as devnull, \
            contextlib.redirect_stdout(devnull):  # stdout carries the JSON result only
        runs = interleaved({"raw": lambda: run_raw(cfg, data, options),
                            "kiln": lambda: run_kiln(cfg, data, options, root)}, args.repeats)
    wall = {n: [r[0][0] for r in rs] for n, rs in runs.items()}
    cpu = {n: [r[0][1] for r in rs] for n, rs in runs.items()}
    diffs = [float((k[1] - r[1]).abs().max()) for k, r in zip(runs["kiln"], runs["raw"])]
    match = max(diffs) <= 1e-5
    ratio = paired_ratio(wall["kiln"], wall["raw"])
    result = {
        "benchmark": "compile", "backend": args.backend, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "batch_shape": [16, 8, 64], "threads": 1,
        "us_per_step": {n: 1e6 * median(v) for n, v in wall.items()},
        "cpu_us_per_step": {n: 1e6 * median(v) for n, v in cpu.items()},
        "max_weight_diff": max(diffs), "weights_match": match,
        "checks": [{"name": "Compiled step, transformer block", "measured": "kiln compile", "baseline": "raw compiled",
                    "measured_s": median(wall["kiln"]), "baseline_s": median(wall["raw"]), "ratio": ratio,
                    "cpu_ratio": paired_ratio(cpu["kiln"], cpu["raw"]), "target": TARGET,
                    "passed": ratio <= TARGET and match}],
        "machine": machine_info(),
    }
    table = format_table(["contender", "µs/step", "CPU µs/step"],
                         [[n, result["us_per_step"][n], result["cpu_us_per_step"][n]] for n in wall])
    table += (f"\n\nKiln / raw (median of per-round ratios): {ratio:.3f} (target ≤ {TARGET}); CPU "
              f"{result['checks'][0]['cpu_ratio']:.3f}; backend {args.backend}; weights == raw: {match} "
              f"(max Δ {max(diffs):.1e})")
    emit(result, args.json, table)
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
