"""Data parallel on 2 CPU processes (gloo): Kiln DDP vs a raw DDP loop per step; FSDP vs DDP memory.

Per-step overhead: both ranks run, in the same two processes and interleaved (raw, Kiln, Kiln, raw,
...), a raw ``DistributedDataParallel`` loop (``DistributedSampler``, TensorBoard on rank 0 every
``log_every_n_steps``) and ``Trainer(strategy="ddp", devices=2)`` (``self.log("loss", loss)`` every step,
default logger and callbacks but checkpointing), on the tiny MLP of ``bench_overhead.py``, 1 thread per
rank. The clock reads rank 0's steady state (from step ``warmup`` to ``warmup + steps``). The final
weights of every Kiln run must equal the raw loop's (the script exits 1 otherwise).

Memory: a wider MLP trained for a few AdamW steps under Kiln ``strategy="ddp"`` and ``strategy="fsdp"``;
per rank, the bytes of the parameters and optimizer state this rank holds (DTensor shards counted
locally). FSDP's gathered full weights must match DDP's.

    python benchmarks/bench_ddp.py [--steps 300] [--repeats 9] [--json]

Targets (DESIGN.md §6): Kiln DDP / raw DDP ≤ 1.10; FSDP per-rank parameter + optimizer memory ≤ 0.55 × DDP.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from common import REPO_ROOT, emit, format_table, machine_info, median, paired_ratio
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

STEP_TARGET, MEMORY_TARGET = 1.10, 0.55
WORLD = 2
BATCH, FEATURES, CLASSES = 32, 32, 10
LR, MOMENTUM = 0.01, 0.9
MEMORY_WIDTH, MEMORY_STEPS = 512, 3
DEVICE = "cpu"  # set by --device; "cuda" (bench_gpu.py) runs NCCL, one GPU per rank


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else torch.device("cpu")


def stamp() -> tuple[float, float]:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


@dataclass(frozen=True)
class Config:
    steps: int
    warmup: int
    repeats: int
    log_every_n_steps: int

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + 1  # the clock stops at the start of the last step


def make_mlp(width: int = 64) -> nn.Sequential:
    torch.manual_seed(0)  # identical initial weights on every rank and for every contender
    return nn.Sequential(nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, CLASSES))


def make_data(steps: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    n = steps * BATCH * WORLD
    return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


class Clock:
    """Wall and CPU time at the start of step ``start`` and of step ``stop``."""

    def __init__(self, cfg: Config) -> None:
        self.start, self.stop = cfg.warmup, cfg.warmup + cfg.steps
        self.t0 = self.t1 = (0.0, 0.0)

    def tick(self, step: int) -> None:
        if step == self.start:
            self.t0 = stamp()
        elif step == self.stop:
            self.t1 = stamp()

    def per_step(self) -> tuple[float, float]:
        n = self.stop - self.start
        return (self.t1[0] - self.t0[0]) / n, (self.t1[1] - self.t0[1]) / n


def flat(params: Any) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


# ---- contenders (run on every rank) ----------------------------------------------------------------
def run_raw(cfg: Config, data: TensorDataset, root: str) -> tuple[tuple[float, float], torch.Tensor]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler
    from torch.utils.tensorboard import SummaryWriter

    dev = device()
    model = DistributedDataParallel(make_mlp().to(dev), device_ids=[dev.index] if dev.type == "cuda" else None)
    clock = Clock(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loader = DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, shuffle=False))
    writer = SummaryWriter(root) if dist.get_rank() == 0 else None
    model.train()
    for i, (x, y) in enumerate(loader):
        if i == cfg.total_steps:
            break
        clock.tick(i)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if writer is not None and (i + 1) % cfg.log_every_n_steps == 0:
            writer.add_scalar("loss", loss.item(), i + 1)
    if writer is not None:
        writer.close()
    return clock.per_step(), flat(model.module.parameters())


def kiln_module(net: nn.Module, optimizer: str, clock: Clock | None = None) -> Any:
    from framework import TrainModule

    class Net(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            if clock is not None:
                clock.tick(batch_idx)
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            if optimizer == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=1e-3)
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    return Net()


def run_kiln(cfg: Config, data: TensorDataset, root: str) -> tuple[tuple[float, float], torch.Tensor]:
    from framework import Trainer

    clock = Clock(cfg)
    module = kiln_module(make_mlp(), "sgd", clock)
    trainer = Trainer(enable_model_summary=False, strategy="ddp", accelerator=DEVICE, devices=WORLD, max_steps=cfg.total_steps,
                      enable_checkpointing=False, default_root_dir=root, log_every_n_steps=cfg.log_every_n_steps)
    trainer.fit(module, DataLoader(data, batch_size=BATCH, shuffle=False))
    return clock.per_step(), flat(module.net.parameters())


def held_bytes(tensors: Any) -> int:
    """Bytes of the tensors this rank holds (a DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def memory_run(strategy: str, data: TensorDataset, root: str) -> dict[str, Any]:
    """Train a few AdamW steps; this rank's parameter / optimizer bytes and the full final weights."""
    from framework import Trainer

    module = kiln_module(make_mlp(MEMORY_WIDTH), "adamw")
    trainer = Trainer(enable_model_summary=False, strategy=strategy, accelerator=DEVICE, devices=WORLD, max_steps=MEMORY_STEPS,
                      enable_checkpointing=False, logger=False, enable_progress_bar=False, default_root_dir=root)
    trainer.fit(module, DataLoader(data, batch_size=BATCH, shuffle=False))
    optimizer = trainer.optimizers[0]
    optimizer = getattr(optimizer, "optimizer", optimizer)
    params = list(module.parameters())
    state = [v for s in optimizer.state.values() for v in s.values()]
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
    return {"param_bytes": held_bytes(params), "optimizer_bytes": held_bytes(state),
            "full_param_bytes": sum(p.numel() * p.element_size() for p in full), "weights": flat(full)}


# ---- the worker (one per rank) --------------------------------------------------------------------
def worker(cfg: Config, out_file: str, with_memory: bool, warm_up: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # Kiln's DDP strategy reuses the group; the raw loop needs one too
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    rank = dist.get_rank()
    data = make_data(cfg.total_steps)
    contenders = {"raw": run_raw, "kiln": run_kiln}
    runs: dict[str, list[tuple[tuple[float, float], torch.Tensor]]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as root, _quiet():
        if warm_up:
            run_kiln(cfg, data, root)  # imports, process-group and logger set-up are not per-step costs
        for round_idx in range(cfg.repeats):
            names = list(contenders)[round_idx % 2:] + list(contenders)[:round_idx % 2]
            for name in names:
                dist.barrier()
                with tempfile.TemporaryDirectory(dir=root) as run_root:
                    runs[name].append(contenders[name](cfg, data, run_root))
        memory = {}
        if with_memory:
            for strategy in ("ddp", "fsdp"):
                memory[strategy] = memory_run(strategy, make_data(MEMORY_STEPS), root)
    reference = runs["raw"][0][1]
    max_diff = max(float((w - reference).abs().max()) for name_runs in runs.values() for _, w in name_runs)
    memory_diff = None
    if memory:
        memory_diff = float((memory["fsdp"].pop("weights") - memory["ddp"].pop("weights")).abs().max())
    gathered: list[Any] = [None] * WORLD
    dist.all_gather_object(gathered, {"memory": memory})
    if rank == 0:
        result = {
            "per_step": {name: [r[0] for r in name_runs] for name, name_runs in runs.items()},
            "max_weight_diff": max_diff, "memory_by_rank": [g["memory"] for g in gathered],
            "fsdp_vs_ddp_weight_diff": memory_diff,
        }
        with open(out_file, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def _quiet():
    logging.getLogger("framework").setLevel(logging.ERROR)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---- the parent ---------------------------------------------------------------------------------------
def summarize(cfg: Config, raw: dict[str, Any], with_memory: bool) -> dict[str, Any]:
    wall = {name: [r[0] for r in runs] for name, runs in raw["per_step"].items()}
    cpu = {name: [r[1] for r in runs] for name, runs in raw["per_step"].items()}
    ratio = paired_ratio(wall["kiln"], wall["raw"])
    weights_match = raw["max_weight_diff"] <= 1e-5
    checks = [{"name": "DDP per step (2 processes)", "measured": "kiln ddp", "baseline": "raw ddp",
               "measured_s": median(wall["kiln"]), "baseline_s": median(wall["raw"]), "ratio": ratio,
               "cpu_ratio": paired_ratio(cpu["kiln"], cpu["raw"]), "target": STEP_TARGET,
               "passed": ratio <= STEP_TARGET and weights_match}]
    result: dict[str, Any] = {
        "benchmark": "ddp", "device": DEVICE, "world_size": WORLD, "backend": "nccl" if DEVICE == "cuda" else "gloo", "threads_per_rank": 1,
        "steps": cfg.steps, "warmup": cfg.warmup, "repeats": cfg.repeats, "batch_per_rank": BATCH,
        "us_per_step": {name: 1e6 * median(v) for name, v in wall.items()},
        "cpu_us_per_step": {name: 1e6 * median(v) for name, v in cpu.items()},
        "runs_us": {name: [1e6 * x for x in v] for name, v in wall.items()},
        "max_weight_diff": raw["max_weight_diff"], "weights_match": weights_match, "checks": checks,
    }
    if with_memory:
        per_rank = raw["memory_by_rank"]
        held = {s: max(m[s]["param_bytes"] + m[s]["optimizer_bytes"] for m in per_rank) for s in ("ddp", "fsdp")}
        mem_ratio = held["fsdp"] / held["ddp"]
        memory_match = raw["fsdp_vs_ddp_weight_diff"] <= 1e-4
        result.update(memory_by_rank=per_rank, fsdp_vs_ddp_weight_diff=raw["fsdp_vs_ddp_weight_diff"],
                      memory_weights_match=memory_match, memory_width=MEMORY_WIDTH)
        checks.append({"name": "FSDP memory per rank (params + optimizer)", "measured": "kiln fsdp",
                       "baseline": "kiln ddp", "measured_bytes": held["fsdp"], "baseline_bytes": held["ddp"],
                       "ratio": mem_ratio, "target": MEMORY_TARGET, "passed": mem_ratio <= MEMORY_TARGET and memory_match})
    return result


def table(result: dict[str, Any]) -> str:
    rows = [(name, result["us_per_step"][name], result["cpu_us_per_step"][name]) for name in result["us_per_step"]]
    text = format_table(["contender (rank 0)", "µs/step", "CPU µs/step"], rows)
    check = result["checks"][0]
    text += (f"\n\nKiln / raw DDP = {check['ratio']:.3f} wall, {check['cpu_ratio']:.3f} CPU (target ≤ {check['target']}: "
             f"{'met' if check['passed'] else 'MISSED'}); weights == raw: "
             f"{'yes' if result['weights_match'] else 'NO'} (max |Δ| {result['max_weight_diff']:.1e})")
    if len(result["checks"]) > 1:
        mem = result["checks"][1]
        rows = [(s, m["param_bytes"] / 1024, m["optimizer_bytes"] / 1024, m["full_param_bytes"] / 1024)
                for s, m in result["memory_by_rank"][0].items()]
        text += "\n\n" + format_table(["rank 0", "params KiB", "optimizer KiB", "full model KiB"], rows)
        text += (f"\n\nFSDP / DDP params + optimizer per rank = {mem['ratio']:.3f} (target ≤ {mem['target']}: "
                 f"{'met' if mem['passed'] else 'MISSED'}); FSDP weights == DDP's: "
                 f"{'yes' if result['memory_weights_match'] else 'NO'} (max |Δ| {result['fsdp_vs_ddp_weight_diff']:.1e})")
    return text + (f"\n{WORLD} processes on {result['device']}, {result['backend']}, 1 thread each, batch {BATCH} per rank, {result['steps']} timed steps "
                   f"after {result['warmup']}, median of {result['repeats']} interleaved rounds.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Kiln DDP vs raw DDP per step; FSDP vs DDP memory (2 CPU processes).")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="steps before the clock starts")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (median taken)")
    parser.add_argument("--log-every-n-steps", type=int, default=50)
    parser.add_argument("--no-memory", action="store_true", help="skip the FSDP vs DDP memory measurement")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole 2-process job")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: gloo; cuda: NCCL, one GPU per rank (needs 2 GPUs)")
    parser.add_argument("--quick", action="store_true", help="few steps, 1 round: proves the script works")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--worker", metavar="OUT_JSON", help=argparse.SUPPRESS)  # set for the ranks themselves
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 10, 3, 1
    for name in ("steps", "warmup", "repeats", "log_every_n_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.device == "cuda" and torch.cuda.device_count() < WORLD:
        parser.error(f"--device cuda needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    global DEVICE
    DEVICE = args.device
    cfg = Config(args.steps, args.warmup, args.repeats, args.log_every_n_steps)
    if args.worker:
        worker(cfg, args.worker, not args.no_memory, warm_up=not args.quick)
        # Everything is written and the group destroyed. Leave without interpreter teardown: once in
        # CI (loaded machine) a rank aborted there with std::terminate from a torch-internal thread.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    from framework.testing import run_distributed

    forwarded = ["--device", args.device, "--steps", args.steps, "--warmup", args.warmup, "--repeats", args.repeats,
                 "--log-every-n-steps", args.log_every_n_steps] + (["--no-memory"] if args.no_memory else []) \
        + (["--quick"] if args.quick else [])
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.json")
        run_distributed(os.path.abspath(__file__), WORLD, timeout=args.timeout, args=[*forwarded, "--worker", out_file],
                        env={"PYTHONPATH": os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH"))))},
                        stream=False)
        with open(out_file) as f:
            raw = json.load(f)
    result = summarize(cfg, raw, not args.no_memory)
    result["machine"] = machine_info()
    emit(result, args.json, table(result))
    if not result["weights_match"] or not result.get("memory_weights_match", True):
        print("FAILED: the contenders' final weights differ (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
