"""Per-step overhead of Kiln against a raw PyTorch loop (and Lightning / Accelerate when installed).

Every contender trains the same model from the same initial weights on the same batches in the same
order, on 1 thread, logging the loss every step the way that framework is normally used (Kiln and
Lightning: `self.log("loss", loss)`, their default TensorBoard logger and progress bar writing to
/dev/null, no checkpointing; raw loop and Accelerate: TensorBoard every `log_every_n_steps` steps).
The clock reads steady state only: from the start of step `warmup` to the start of step
`warmup + steps`, so start-up and teardown are excluded (shown separately as "run s").
Contenders run interleaved, rotating the order each round; the table shows medians and the median of
per-round ratios to the raw loop. The final weights of every contender are compared with the raw
loop's, so that a fast but wrong loop cannot win; the script exits 1 if Kiln's differ.

    python benchmarks/bench_overhead.py [--model mlp|transformer|logging|all] [--steps 600] [--repeats 7] [--json]

Target (DESIGN.md §6): Kiln / raw ≤ 1.05 on the tiny MLP. The third model, ``logging``, is the tiny MLP
logging N = 0, 10, 50 extra values per step (``self.log(name, loss, on_step=True, on_epoch=True)``):
Kiln's step time with 50 values must stay ≤ 1.5 × its step time with none (issue #18); the per-call cost
is (step time with N − step time with 0) / N.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import emit, format_table, interleaved, is_installed, machine_info, median, paired_ratio
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

TARGET_RATIO = 1.05
LR, MOMENTUM = 0.01, 0.9
BATCH_SHAPES = {"mlp": (32, 32), "transformer": (16, 8, 64), "logging": (32, 32)}  # (batch, features) / (batch, seq, d_model)
DEFAULT_STEPS = {"mlp": 600, "transformer": 200, "logging": 600}
LOG_COUNTS = (0, 10, 50)
LOG_TARGET = 1.5  # Kiln step time with 50 logged values / with none


@dataclass(frozen=True)
class Config:
    model: str
    steps: int  # timed steps
    warmup: int  # steps before the clock starts
    log_every_n_steps: int
    extra_logs: int = 0  # values logged per step besides the loss (the "logging" model)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + 1  # the clock stops at the start of the last step


# ---- the workload ------------------------------------------------------------------------------
class Classifier(nn.Module):
    """Tiny MLP 32→64→64→10, or one small transformer encoder block with a linear head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        else:
            self.body = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=256, dropout=0.0,
                                                   batch_first=True)
            self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if self.kind == "mlp" else self.head(self.body(x).mean(dim=1))


def make_model(kind: str) -> Classifier:
    torch.manual_seed(0)  # identical initial weights for every contender
    return Classifier("mlp" if kind == "logging" else kind)


class PreBatched(Dataset):
    """Ready-made batches, so that the loader costs the same small amount for every contender."""

    def __init__(self, kind: str, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        shape = BATCH_SHAPES[kind]
        self.batches = [(torch.randn(shape, generator=g), torch.randint(0, 10, shape[:1], generator=g))
                        for _ in range(n)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[i]


def make_loader(data: PreBatched) -> DataLoader:
    return DataLoader(data, batch_size=None, shuffle=False)


class Clock:
    """Reads wall and process CPU time at the start of step `start` and of step `stop`.

    Called first thing in every step. CPU time (all threads of this process) is the steadier figure
    on a machine that other processes share; wall time is what a user waits.
    """

    def __init__(self, cfg: Config) -> None:
        self.start, self.stop = cfg.warmup, cfg.warmup + cfg.steps
        self.t0 = self.t1 = None

    def tick(self, step: int) -> None:
        if step == self.start:
            self.t0 = (time.perf_counter(), time.process_time())
        elif step == self.stop:
            self.t1 = (time.perf_counter(), time.process_time())

    def per_step(self) -> tuple[float, float]:
        """(wall, cpu) seconds per step."""
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"the timed window (steps {self.start}..{self.stop}) was not reached")
        n = self.stop - self.start
        return (self.t1[0] - self.t0[0]) / n, (self.t1[1] - self.t0[1]) / n


@dataclass
class Run:
    per_step: tuple[float, float]  # (wall, cpu) seconds
    wall_s: float
    weights: torch.Tensor


# ---- contenders: each trains cfg.total_steps steps and returns the timed Run ---------------------
def run_raw(cfg: Config, data: PreBatched, root: str) -> Run:
    from torch.utils.tensorboard import SummaryWriter

    model, clock = make_model(cfg.model), Clock(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    writer = SummaryWriter(root)
    model.train()
    for i, (x, y) in enumerate(make_loader(data)):
        clock.tick(i)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (i + 1) % cfg.log_every_n_steps == 0:
            writer.add_scalar("loss", loss.item(), i + 1)
    writer.close()
    return Run(clock.per_step(), 0.0, flat_weights(model))


def run_kiln(cfg: Config, data: PreBatched, root: str) -> Run:
    from framework import DistributedState, Trainer, TrainModule

    extra = [f"value_{i}" for i in range(cfg.extra_logs)]

    class KilnModule(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(cfg.model)
            self.clock = Clock(cfg)

        def training_step(self, batch, batch_idx):
            self.clock.tick(batch_idx)
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            for name in extra:
                self.log(name, loss, on_step=True, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM)

    module = KilnModule()
    trainer = Trainer(max_steps=cfg.total_steps, enable_checkpointing=False, default_root_dir=root,
                      log_every_n_steps=cfg.log_every_n_steps)
    trainer.fit(module, make_loader(data))
    DistributedState._reset_state()  # the next Trainer in this process starts from a clean topology
    return Run(module.clock.per_step(), 0.0, flat_weights(module.net))


def run_lightning(cfg: Config, data: PreBatched, root: str) -> Run:
    import pytorch_lightning as pl

    extra = [f"value_{i}" for i in range(cfg.extra_logs)]

    class LitModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(cfg.model)
            self.clock = Clock(cfg)

        def training_step(self, batch, batch_idx):
            self.clock.tick(batch_idx)
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("loss", loss)
            for name in extra:
                self.log(name, loss, on_step=True, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM)

    module = LitModule()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=cfg.total_steps, enable_checkpointing=False,
                         default_root_dir=root, log_every_n_steps=cfg.log_every_n_steps)
    trainer.fit(module, make_loader(data))
    return Run(module.clock.per_step(), 0.0, flat_weights(module.net))


def run_accelerate(cfg: Config, data: PreBatched, root: str) -> Run:
    from accelerate import Accelerator

    model, clock = make_model(cfg.model), Clock(cfg)
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=root)
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
    return Run(clock.per_step(), 0.0, flat_weights(accelerator.unwrap_model(prepared)))


CONTENDERS: dict[str, tuple[Callable[[Config, PreBatched, str], Run], str | None]] = {
    "raw": (run_raw, None),
    "kiln": (run_kiln, None),
    "lightning": (run_lightning, "pytorch_lightning"),
    "accelerate": (run_accelerate, "accelerate"),
}


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def timed(contender: Callable[[Config, PreBatched, str], Run], cfg: Config, data: PreBatched,
          quiet: bool) -> Run:
    """One run in a fresh temporary root, its console output (progress bars, banners) sent to /dev/null."""
    gc.collect()
    with tempfile.TemporaryDirectory() as root, _silenced(quiet):
        start = time.perf_counter()
        run = contender(cfg, data, root)
        run.wall_s = time.perf_counter() - start
    if torch.get_num_threads() != 1:
        raise RuntimeError(f"{contender.__name__} changed torch's thread count to {torch.get_num_threads()}")
    return run


@contextlib.contextmanager
def _silenced(quiet: bool):
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def bench_model(cfg: Config, names: list[str], repeats: int, quiet: bool) -> dict[str, dict]:
    data = PreBatched(cfg.model, cfg.total_steps)
    runs = interleaved({name: (lambda fn=CONTENDERS[name][0]: timed(fn, cfg, data, quiet)) for name in names},
                       repeats)
    raw_wall = [r.per_step[0] for r in runs["raw"]]
    raw_cpu = [r.per_step[1] for r in runs["raw"]]
    reference = runs["raw"][0].weights
    results = {}
    for name, name_runs in runs.items():
        per_step = [r.per_step[0] for r in name_runs]
        cpu_per_step = [r.per_step[1] for r in name_runs]
        max_diff = max(float((r.weights - reference).abs().max()) for r in name_runs)
        results[name] = {
            "us_per_step": 1e6 * median(per_step),
            "ratio_to_raw": paired_ratio(per_step, raw_wall),
            "cpu_us_per_step": 1e6 * median(cpu_per_step),
            "cpu_ratio_to_raw": paired_ratio(cpu_per_step, raw_cpu),
            "run_s": median([r.wall_s for r in name_runs]),
            "max_weight_diff": max_diff,
            "weights_match": max_diff <= 1e-5,
            "runs_us": [1e6 * t for t in per_step],
            "runs_cpu_us": [1e6 * t for t in cpu_per_step],
        }
    return results


def logging_summary(by_count: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Per framework: step time per N, its ratio to N = 0 (paired rounds) and the per-call cost of self.log."""
    summary: dict[str, dict] = {}
    for name in ("kiln", "lightning"):
        if name not in by_count[LOG_COUNTS[0]]:
            continue
        rows = {}
        for n in LOG_COUNTS:
            row = {}
            for clock, key in (("", "runs_us"), ("cpu_", "runs_cpu_us")):
                base, runs = by_count[LOG_COUNTS[0]][name][key], by_count[n][name][key]
                row.update({f"{clock}us_per_step": median(runs), f"{clock}ratio_to_none": paired_ratio(runs, base),
                            f"{clock}us_per_call": (median(runs) - median(base)) / n if n else None})
            rows[n] = row
        summary[name] = rows
    return summary


def logging_table(summary: dict[str, dict], configs_steps: int) -> str:
    rows = []
    for n in LOG_COUNTS:
        row: list = [n]
        for name in ("kiln", "lightning"):
            for clock in ("", "cpu_"):
                r = summary.get(name, {}).get(n)
                call = None if r is None else r[f"{clock}us_per_call"]
                row += ["—", "—", "—"] if r is None else [r[f"{clock}us_per_step"], r[f"{clock}ratio_to_none"],
                                                           "—" if call is None else call]
        rows.append(row)
    headers = ["values logged"]
    for name in ("Kiln", "Lightning"):
        for clock in ("", "CPU "):
            headers += [f"{name} {clock}µs/step", f"{name} {clock}× none", f"{name} {clock}µs/call"]
    table = format_table(headers, rows)
    verdict = ""
    if "kiln" in summary:
        last = summary["kiln"][LOG_COUNTS[-1]]
        ratio = last["ratio_to_none"]
        verdict = (f"\n\nKiln with {LOG_COUNTS[-1]} values / none = {ratio:.3f} wall, {last['cpu_ratio_to_none']:.3f} "
                   f"CPU (target ≤ {LOG_TARGET} wall: {'met' if ratio <= LOG_TARGET else 'MISSED'})")
    return (f"### logging (tiny MLP, N extra `self.log(name, loss, on_step=True, on_epoch=True)` per step, "
            f"{configs_steps} timed steps)\n\n" + table + verdict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Per-step overhead: raw loop vs Kiln, Lightning, Accelerate.")
    parser.add_argument("--model", choices=["mlp", "transformer", "logging", "all"], default="all")
    parser.add_argument("--steps", type=int, help=f"timed steps per run (default: {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, default=50, help="steps before the clock starts")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median taken)")
    parser.add_argument("--log-every-n-steps", type=int, default=50)
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), help="contenders to run (raw always runs)")
    parser.add_argument("--verbose", action="store_true", help="let progress bars, banners and warnings through")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "repeats", "log_every_n_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")

    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    wanted = ["raw", *(n for n in (args.only or CONTENDERS) if n != "raw")]
    names = [n for n in wanted if CONTENDERS[n][1] is None or is_installed(CONTENDERS[n][1])]
    skipped = [n for n in wanted if n not in names]

    models = ["mlp", "transformer", "logging"] if args.model == "all" else [args.model]
    configs = {m: Config(m, args.steps or DEFAULT_STEPS[m], args.warmup, args.log_every_n_steps)
               for m in models if m != "logging"}
    results = {m: bench_model(cfg, names, args.repeats, quiet=not args.verbose) for m, cfg in configs.items()}
    logging_results = None
    if "logging" in models:
        log_names = [n for n in names if n in ("raw", "kiln", "lightning")]
        logging_results = {n: bench_model(Config("logging", args.steps or DEFAULT_STEPS["logging"], args.warmup,
                                                 args.log_every_n_steps, n), log_names, args.repeats,
                                          quiet=not args.verbose) for n in LOG_COUNTS}

    kiln_ok = all(r["kiln"]["weights_match"] for r in [*results.values(), *(logging_results or {}).values()]
                  if "kiln" in r)
    result = {"benchmark": "overhead", "target_ratio": TARGET_RATIO, "threads": 1,
              "batch_shapes": {m: BATCH_SHAPES[m] for m in models},
              "steps": {m: cfg.steps for m, cfg in configs.items()}, "warmup": args.warmup, "repeats": args.repeats,
              "log_every_n_steps": args.log_every_n_steps, "skipped": skipped, "results": results,
              "machine": machine_info()}
    if logging_results is not None:
        result["logging"] = {"counts": list(LOG_COUNTS), "target_ratio": LOG_TARGET, "results": logging_results,
                             "summary": logging_summary(logging_results)}
    tables = []
    for model, res in results.items():
        rows = [(name, r["us_per_step"], r["ratio_to_raw"], r["cpu_us_per_step"], r["cpu_ratio_to_raw"], r["run_s"],
                 f"{'yes' if r['weights_match'] else 'NO'} ({r['max_weight_diff']:.1e})")
                for name, r in res.items()]
        shape = "×".join(map(str, BATCH_SHAPES[model]))
        tables.append(f"### {model} (batch {shape}, {configs[model].steps} timed steps)\n\n" + format_table(
            ["contender", "µs/step", "× raw", "CPU µs/step", "CPU × raw", "run s", "weights == raw (max |Δ|)"], rows))
        if model == "mlp" and "kiln" in res:
            ratio = res["kiln"]["ratio_to_raw"]
            verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
            tables[-1] += (f"\n\nKiln / raw = {ratio:.3f} wall, {res['kiln']['cpu_ratio_to_raw']:.3f} CPU "
                           f"(target ≤ {TARGET_RATIO} wall: {verdict})")
    if logging_results is not None:
        tables.append(logging_table(result["logging"]["summary"], configs_steps=args.steps or DEFAULT_STEPS["logging"]))
    footer = (f"\n\n1 thread, {args.warmup} warm-up steps, median of {args.repeats} interleaved rounds; "
              "× raw = median of per-round ratios; CPU = process CPU time, all threads; run s includes start-up.")
    if skipped:
        footer += f"\nNot installed, skipped: {', '.join(skipped)}."
    emit(result, args.json, "\n\n".join(tables) + footer)
    if not kiln_ok:
        print("FAILED: Kiln's final weights differ from the raw loop's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
