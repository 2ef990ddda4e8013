"""Cost of ``self.log`` per call, and process memory over one long epoch: Kiln and Lightning side by side.

Each framework runs in its own fresh process (Lightning from ``--lightning-python``, ``$KILN_LIGHTNING_PYTHON``
or this interpreter when it has pytorch_lightning) training a tiny MLP (1 thread, batch 16, CSV logger,
``log_every_n_steps=50``) for one epoch of ``--steps`` batches, logging the loss plus ``--values`` values
per step with ``self.log(name, value, on_step=True, on_epoch=True)``:

- per call: at step ``--steps // 2``, ``training_step`` times ``--calls`` extra calls of ``self.log`` on a
  scalar CPU tensor (under the real hook, so Lightning's per-hook bookkeeping is included), wall and CPU;
- memory: resident set size at 10 % and at 100 % of the epoch (``/proc/self/statm``); flat means O(1)
  state per logged key, growth means something is kept per step.

    python benchmarks/bench_logging.py [--steps 5000] [--values 50] [--calls 2000] [--json]

Target (issue #18): Kiln ≤ 10 µs per call; RSS flat over the epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

from common import REPO_ROOT, emit, format_table, is_installed, machine_info

TARGET_US_PER_CALL = 10.0


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(framework: str, steps: int, values: int, calls: int, root: str) -> dict:
    """Train one epoch in this process and return the measurements."""
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if framework == "lightning":
        import pytorch_lightning as pl
        from pytorch_lightning.loggers import CSVLogger

        base, trainer_kwargs = pl.LightningModule, {"accelerator": "cpu", "devices": 1, "enable_model_summary": False}
    else:
        from framework import Trainer, TrainModule
        from framework.loggers import CSVLogger

        base, trainer_kwargs = TrainModule, {}
    found: dict = {}

    class Bench(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
            self.names = [f"value_{i}" for i in range(values)]

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            for name in self.names:
                self.log(name, loss, on_step=True, on_epoch=True)
            if batch_idx == steps // 10:
                found["rss_10"] = rss_mib()
            if batch_idx == steps // 2:
                scalar = torch.tensor(0.5)
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    self.log("timed", scalar, on_step=True, on_epoch=True)
                found["us_per_call"] = 1e6 * (time.perf_counter() - wall) / calls
                found["cpu_us_per_call"] = 1e6 * (time.process_time() - cpu) / calls
            if batch_idx == steps - 1:
                found["rss_100"] = rss_mib()
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(steps * 16, 32, generator=g), torch.randint(0, 10, (steps * 16,), generator=g))
    trainer = (pl.Trainer if framework == "lightning" else Trainer)(
        max_epochs=1, logger=CSVLogger(root), enable_checkpointing=False, enable_progress_bar=False,
        log_every_n_steps=50, **trainer_kwargs)
    start = time.perf_counter()
    trainer.fit(Bench(), DataLoader(data, batch_size=16))
    found["epoch_s"] = time.perf_counter() - start
    found["growth_mib"] = found["rss_100"] - found["rss_10"]
    return found


def lightning_python(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("KILN_LIGHTNING_PYTHON"), "/work/venvs/lightning/bin/python"):
        if candidate and os.path.exists(candidate):
            return candidate
    return sys.executable if is_installed("pytorch_lightning") else None


def run_worker(python: str, framework: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as root:
        cmd = [python, os.path.abspath(__file__), "--worker", framework, "--steps", str(args.steps), "--values",
               str(args.values), "--calls", str(args.calls), "--root", root]
        env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode:
            raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="self.log per-call cost and RSS over a long epoch.")
    parser.add_argument("--steps", type=int, default=5000, help="batches in the epoch")
    parser.add_argument("--values", type=int, default=50, help="values logged per step besides the loss")
    parser.add_argument("--calls", type=int, default=2000, help="self.log calls timed at mid-epoch")
    parser.add_argument("--lightning-python", help="a python with pytorch_lightning 2.x")
    parser.add_argument("--no-lightning", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=["kiln", "lightning"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 20 or args.values < 0 or args.calls < 1:
        parser.error("need --steps >= 20, --values >= 0 and --calls >= 1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.values, args.calls, args.root)))
        return 0

    contenders = {"kiln": sys.executable}
    other = None if args.no_lightning else lightning_python(args.lightning_python)
    if other is not None:
        contenders["lightning"] = other
    results = {name: run_worker(python, name, args) for name, python in contenders.items()}
    rows = [(name, r["us_per_call"], r["cpu_us_per_call"], r["rss_10"], r["rss_100"], r["growth_mib"], r["epoch_s"])
            for name, r in results.items()]
    table = format_table(["framework", "µs/call", "CPU µs/call", "RSS MiB at 10 %", "RSS MiB at 100 %",
                          "growth MiB", "epoch s"], rows)
    kiln = results["kiln"]
    verdict = (f"\n\nKiln: {kiln['cpu_us_per_call']:.2f} CPU µs per call (target ≤ {TARGET_US_PER_CALL}: "
               f"{'met' if kiln['cpu_us_per_call'] <= TARGET_US_PER_CALL else 'MISSED'}), "
               f"RSS growth {kiln['growth_mib']:+.1f} MiB over the last 90 % of a {args.steps}-step epoch.")
    result = {"benchmark": "logging", "steps": args.steps, "values": args.values, "calls": args.calls,
              "target_us_per_call": TARGET_US_PER_CALL, "results": results, "machine": machine_info()}
    header = (f"### self.log: {args.values} values per step (on_step and on_epoch), one {args.steps}-step epoch, "
              "tiny MLP, batch 16, CSV logger every 50 steps, 1 thread\n\n")
    emit(result, args.json, header + table + verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
