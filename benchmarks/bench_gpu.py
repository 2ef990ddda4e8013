"""GPU variants of the overhead, checkpoint and DDP benchmarks; skipped (exit 0) without CUDA.

1. Per-step overhead on one GPU: the tiny MLP and the small transformer block of
   ``bench_overhead.py``, raw loop vs Kiln (and Lightning / Accelerate when installed), interleaved,
   the clock synchronized with the device at the start and the end of the timed window; the final
   weights must match the raw loop's.
2. Checkpoint save/restore with model and AdamW state on the GPU: ``bench_checkpoint.py --device cuda``.
3. DDP on 2 GPUs (NCCL) and FSDP memory: ``bench_ddp.py --device cuda`` (skipped with fewer than 2 GPUs).

``--device cpu`` runs the same code on the CPU, to check it without a GPU (no GPU figures then).

    python benchmarks/bench_gpu.py [--steps 300] [--repeats 5] [--quick] [--json]

Targets: those of DESIGN.md §6 (Kiln / raw ≤ 1.10 per step, checkpoint ≤ 1.25 × raw safetensors,
async blocking ≤ 0.10 × sync, DDP ≤ 1.10, FSDP memory ≤ 0.55 × DDP).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from typing import Any

import torch
from bench_overhead import (
    DEFAULT_STEPS,
    LR,
    MOMENTUM,
    TARGET_RATIO,
    Config,
    PreBatched,
    flat_weights,
    make_loader,
    make_model,
)
from common import (
    REPO_ROOT,
    emit,
    format_table,
    interleaved,
    is_installed,
    machine_info,
    median,
    paired_ratio,
)
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHT_TOLERANCE = 1e-4  # GPU kernels may differ in the last bits between otherwise identical runs
DEVICE = "cuda"


@contextlib.contextmanager
def silenced():
    """Progress bars, banners and warnings of the contenders go to /dev/null."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall time at the start of step ``start`` and of step ``stop``, after the device caught up."""

    def __init__(self, cfg: Config) -> None:
        self.start, self.stop = cfg.warmup, cfg.warmup + cfg.steps
        self.t0 = self.t1 = 0.0

    def tick(self, step: int) -> None:
        import time

        if step in (self.start, self.stop):
            sync()
            setattr(self, "t0" if step == self.start else "t1", time.perf_counter())

    def per_step(self) -> float:
        return (self.t1 - self.t0) / (self.stop - self.start)


# ---- overhead contenders on DEVICE --------------------------------------------------------------------
def gpu_raw(cfg: Config, data: PreBatched, root: str) -> tuple[float, torch.Tensor]:
    from torch.utils.tensorboard import SummaryWriter

    model, clock = make_model(cfg.model).to(DEVICE), Clock(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    writer = SummaryWriter(root)
    model.train()
    for i, (x, y) in enumerate(make_loader(data)):
        clock.tick(i)
        x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (i + 1) % cfg.log_every_n_steps == 0:
            writer.add_scalar("loss", loss.item(), i + 1)
    writer.close()
    return clock.per_step(), flat_weights(model).cpu()


def _step_module(base: type, cfg: Config) -> Any:
    class Net(base):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(cfg.model)
            self.clock = Clock(cfg)

        def training_step(self, batch, batch_idx):
            self.clock.tick(batch_idx)
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM)

    return Net()


def gpu_kiln(cfg: Config, data: PreBatched, root: str) -> tuple[float, torch.Tensor]:
    from framework import DistributedState, Trainer, TrainModule

    module = _step_module(TrainModule, cfg)
    trainer = Trainer(enable_model_summary=False, accelerator=DEVICE, devices=1, max_steps=cfg.total_steps, enable_checkpointing=False,
                      default_root_dir=root, log_every_n_steps=cfg.log_every_n_steps)
    trainer.fit(module, make_loader(data))
    DistributedState._reset_state()
    return module.clock.per_step(), flat_weights(module.net).cpu()


def gpu_lightning(cfg: Config, data: PreBatched, root: str) -> tuple[float, torch.Tensor]:
    import pytorch_lightning as pl

    module = _step_module(pl.LightningModule, cfg)
    trainer = pl.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, max_steps=cfg.total_steps,
                         enable_checkpointing=False, default_root_dir=root, log_every_n_steps=cfg.log_every_n_steps)
    trainer.fit(module, make_loader(data))
    return module.clock.per_step(), flat_weights(module.net).cpu()


def gpu_accelerate(cfg: Config, data: PreBatched, root: str) -> tuple[float, torch.Tensor]:
    from accelerate import Accelerator

    model, clock = make_model(cfg.model), Clock(cfg)
    accelerator = Accelerator(cpu=DEVICE == "cpu", log_with="tensorboard", project_dir=root)
    accelerator.init_trackers("bench")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, make_loader(data))
    prepared.train()
    for i, (x, y) in enumerate(loader):
        clock.tick(i)
        loss = F.cross_entropy(prepared(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (i + 1) % cfg.log_every_n_steps == 0:
            accelerator.log({"loss": loss.item()}, step=i + 1)
    accelerator.end_training()
    return clock.per_step(), flat_weights(accelerator.unwrap_model(prepared)).cpu()


CONTENDERS = {"raw": (gpu_raw, None), "kiln": (gpu_kiln, None), "lightning": (gpu_lightning, "pytorch_lightning"),
              "accelerate": (gpu_accelerate, "accelerate")}


def overhead(cfg: Config, repeats: int, names: list[str]) -> dict[str, Any]:
    data = PreBatched(cfg.model, cfg.total_steps)

    def one(fn: Any) -> tuple[float, torch.Tensor]:
        with tempfile.TemporaryDirectory() as root, silenced():
            return fn(cfg, data, root)

    runs = interleaved({name: (lambda fn=CONTENDERS[name][0]: one(fn)) for name in names}, repeats)
    raw = [r[0] for r in runs["raw"]]
    reference = runs["raw"][0][1]
    out = {}
    for name, name_runs in runs.items():
        diff = max(float((w - reference).abs().max()) for _, w in name_runs)
        out[name] = {"us_per_step": 1e6 * median([r[0] for r in name_runs]),
                     "ratio_to_raw": paired_ratio([r[0] for r in name_runs], raw),
                     "max_weight_diff": diff, "weights_match": diff <= WEIGHT_TOLERANCE}
    return out


def sub_benchmark(script: str, args: list[str]) -> dict[str, Any]:
    """Run another benchmark script with ``--json``; its result, or why it failed."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args, "--json"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"failed": True, "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU variants of the overhead, checkpoint and DDP benchmarks.")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu runs the same code without a GPU (a check of the script, not a GPU figure)")
    parser.add_argument("--steps", type=int, help=f"timed steps per overhead run (default: {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median taken)")
    parser.add_argument("--log-every-n-steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="few steps, tiny checkpoint, 1 round")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        reason = f"CUDA is not available (torch {torch.__version__}); GPU benchmarks skipped"
        result = {"benchmark": "gpu", "skipped": True, "reason": reason, "checks": [], "machine": machine_info()}
        emit(result, args.json, f"SKIPPED: {reason}.")
        return 0
    if args.quick:
        args.steps, args.warmup, args.repeats = 10, 3, 1
    torch.set_num_threads(1)

    names = [n for n, (_, module) in CONTENDERS.items() if module is None or is_installed(module)]
    if args.quick:
        names = ["raw", "kiln"]
    results: dict[str, Any] = {"benchmark": "gpu", "device": DEVICE, "skipped": False, "overhead": {}}
    if DEVICE == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
        results["gpu_count"] = torch.cuda.device_count()
    checks: list[dict[str, Any]] = []
    label = "GPU" if DEVICE == "cuda" else "GPU code on CPU:"
    for model in ("mlp", "transformer"):
        cfg = Config(model, args.steps or DEFAULT_STEPS[model], args.warmup, args.log_every_n_steps)
        res = overhead(cfg, args.repeats, names)
        results["overhead"][model] = res
        checks.append({"name": f"{label} per step, {model}", "measured": "kiln", "baseline": "raw",
                       "measured_s": res["kiln"]["us_per_step"] / 1e6, "baseline_s": res["raw"]["us_per_step"] / 1e6,
                       "ratio": res["kiln"]["ratio_to_raw"], "target": TARGET_RATIO,
                       "passed": res["kiln"]["ratio_to_raw"] <= TARGET_RATIO and res["kiln"]["weights_match"]})

    quick = ["--quick"] if args.quick else []
    results["checkpoint"] = sub_benchmark("bench_checkpoint.py", ["--device", DEVICE, *quick])
    if DEVICE == "cuda" and torch.cuda.device_count() < 2:
        results["ddp"] = {"skipped": True, "reason": f"needs 2 GPUs, found {torch.cuda.device_count()}"}
    else:
        results["ddp"] = sub_benchmark("bench_ddp.py", ["--device", DEVICE, *quick])
    for part in ("checkpoint", "ddp"):
        checks += [{**c, "name": f"{label} {c['name']}"} for c in results[part].get("checks", [])]
    results["checks"] = checks
    results["machine"] = machine_info()

    rows = [(model, name, r["us_per_step"], r["ratio_to_raw"], "yes" if r["weights_match"] else "NO")
            for model, res in results["overhead"].items() for name, r in res.items()]
    text = f"Device: {results.get('gpu', DEVICE)}\n\n" + format_table(
        ["model", "contender", "µs/step", "× raw", "weights == raw"], rows)
    text += "\n\n" + format_table(["target", "ratio", "target", "verdict"], [
        (c["name"], c["ratio"], f"≤ {c['target']}", "met" if c["passed"] else "MISSED") for c in checks])
    for part in ("checkpoint", "ddp"):
        if results[part].get("failed") or results[part].get("skipped"):
            text += f"\n{part}: " + (results[part].get("reason") or f"FAILED\n{results[part]['stderr']}")
    emit(results, args.json, text)
    failed = [p for p in ("checkpoint", "ddp") if results[p].get("failed")]
    mismatched = [m for m, res in results["overhead"].items() if not res["kiln"]["weights_match"]]
    if failed or mismatched:
        print(f"FAILED: {', '.join(failed + [f'{m} weights' for m in mismatched])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
