"""Checkpoint save/load of a ~50M-parameter model with AdamW state: raw files vs Kiln vs Lightning.

Contenders, each saving and then restoring the same state (model weights + AdamW moments + step):
- raw safetensors: ``save_file`` of the model's and the optimizer's tensors (+ param_groups as JSON);
  restore = ``model.load_state_dict(load_file(...))`` and a fresh AdamW's ``load_state_dict`` with the
  optimizer tensors read eagerly (``backend="pread"``), so that afterwards everything is resident in
  memory exactly as after Kiln's restore. The lazy variant (``mmap``: optimizer state paged in at the
  first step) is shown for reference.
- raw torch: ``torch.save``/``torch.load(weights_only=True)`` of ``{"model", "optimizer"}`` state dicts.
- Kiln sync: ``trainer.save_checkpoint(path)`` after a fit; restore = the checkpoint restore inside
  ``Trainer.fit(ckpt_path=path)`` (from the ``setup`` hook, which runs right before it, to
  ``on_fit_start``, right after it), into a freshly zeroed model and a fresh optimizer. Kiln verifies
  every byte against the manifest checksums while reading. ``fit(ckpt_path)`` → first batch is shown too.
- Kiln async: ``trainer.save_checkpoint(path, writer=AsyncCheckpointWriter())``: the time the training
  loop is blocked (the snapshot into reused buffers), then the background write. The writer's buffers are
  reserved once the optimizer state exists (``reserve()``); its first save is reported with and without that.
- Lightning (when installed): ``trainer.save_checkpoint(path)``; ``fit(ckpt_path)`` → first batch.

Every round runs the contenders in a rotated order (A/B/C, B/C/A, ...), each save followed by its
restore; medians and per-round ratios are reported. Each restore starts like one in a new process: the
previous restore's state is freed and the heap trimmed (glibc ``malloc_trim``), so no contender reads into
pages recycled from the one before (page faults cost as much as the copying on this kind of machine). Every restore is compared bit for bit with the
saved state (and the async checkpoint is read back and compared), so a fast wrong path cannot win;
the script exits 1 if any differs.

    python benchmarks/bench_checkpoint.py [--repeats 7] [--width 1024 --blocks 6] [--dir PATH] [--json]

Targets (DESIGN.md §6): Kiln save and restore ≤ 1.10 × raw safetensors; async blocking ≤ 0.10 × sync save.
Async blocking = the ``save_checkpoint`` call plus the wait before the next optimizer step, measured after the
next step's forward/backward ran (the snapshot copy overlaps it). Also reported: the disk's sequential write
bandwidth (page cache, and fsync'd) measured in the same run against Kiln's and raw safetensors' bytes/s with
``fsync=True``, and the peak resident memory each restore adds (VmHWM, reset before each restore).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import checkpoint_workload as workload
import torch
from checkpoint_workload import (
    LR,
    Mismatch,
    Reference,
    Round,
    build_net,
    disk_write,
    flat_optimizer_tensors,
    kiln_trainer,
    lightning_trainer,
    load_file_eager,
    load_file_lazy,
    loss_of,
    make_loader,
    minus,
    now,
    peak_rss_reset,
    peak_rss_since,
    restore_clock,
    since,
    step_module,
    table,
    trim_heap,
    unflatten_optimizer_tensors,
    zero_,
)
from common import emit, interleaved, is_installed, machine_info, median, paired_ratio

__all__ = ["Bench", "Mismatch", "Reference", "build_net", "main"]

SAVE_TARGET, LOAD_TARGET, ASYNC_TARGET = 1.10, 1.10, 0.10


# ---- the benchmark -------------------------------------------------------------------------------
class Bench:
    """Holds the trained state and the restore targets; each ``round_*`` method is one contender's round."""

    def __init__(self, width: int, blocks: int, root: str, with_lightning: bool) -> None:
        self.width, self.blocks, self.root = width, blocks, root
        self.loader = make_loader(width)
        from framework import TrainModule

        Net = step_module(TrainModule, width, blocks)
        # The saved state: one Kiln fit step (AdamW moments exist after a step).
        self.trained = Net(seed=0)
        self.trainer = kiln_trainer(os.path.join(root, "fit"), max_steps=1)
        self.trainer.fit(self.trained, self.loader)
        self.optimizer = self.trainer.optimizers[0]
        self.reference = Reference(self.trained.net, self.optimizer)
        self.n_params = sum(p.numel() for p in self.trained.parameters())
        self.nbytes = sum(t.numel() * t.element_size() for t in [
            *self.reference.model.values(), *flat_optimizer_tensors(self.reference.optimizer).values()])
        self.target = Net(seed=1).to(workload.DEVICE)  # restores land here (zeroed first)
        from framework.checkpoint import AsyncCheckpointWriter

        # Reserved once the optimizer state exists, as ModelCheckpoint(async_save=True) does after the first step.
        self.writer = AsyncCheckpointWriter()
        self.writer.reserve(module=self.trained, optimizers=[self.optimizer])
        self.async_first_blocking_s: float | None = None
        self.async_first_unreserved_s: float | None = None
        if with_lightning:
            import pytorch_lightning as pl

            self.lit = step_module(pl.LightningModule, width, blocks)(seed=0)
            self.lit_trainer = lightning_trainer(os.path.join(root, "lit-fit"), max_steps=1)
            self.lit_trainer.fit(self.lit, self.loader)
            self.LitTarget = step_module(pl.LightningModule, width, blocks,
                                         Reference(self.lit.net, self.lit_trainer.optimizers[0]))

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def prepare_restore(self) -> None:
        """Every restore starts alike, as in a fresh process: the previous restore's state is dropped and
        the freed memory returned to the OS, so no contender reads into pages recycled from the one before."""
        self.target._trainer = None  # a previous Kiln fit's optimizer state
        zero_(self.target.net)
        gc.collect()
        trim_heap()

    def fresh_target(self) -> torch.optim.Optimizer:
        self.prepare_restore()
        return torch.optim.AdamW(self.target.net.parameters(), lr=LR)

    def round_safetensors(self) -> Round:
        from safetensors.torch import save_file

        d = self.path("raw-st")
        model_file, optim_file, groups_file = (os.path.join(d, n) for n in
                                               ("model.safetensors", "optim.safetensors", "optim.json"))
        t0 = now()
        os.makedirs(d, exist_ok=True)
        save_file(self.trained.net.state_dict(), model_file)
        state = self.optimizer.state_dict()
        save_file(flat_optimizer_tensors(state), optim_file)
        with open(groups_file, "w") as f:
            json.dump(state["param_groups"], f)
        save = since(t0)

        out = {"save": save}
        for variant, read in (("load", load_file_eager), ("load_lazy", load_file_lazy)):
            optimizer = self.fresh_target()
            base = peak_rss_reset()
            t0 = now()
            self.target.net.load_state_dict(load_file_lazy(model_file))
            with open(groups_file) as f:
                groups = json.load(f)
            optimizer.load_state_dict({"state": unflatten_optimizer_tensors(read(optim_file)), "param_groups": groups})
            out[variant] = since(t0)
            out[f"{variant} peak extra MiB"] = {"wall": peak_rss_since(base) / 2**20, "cpu": 0.0}
            self.reference.check(f"raw safetensors {variant}", self.target.net, optimizer.state_dict())
            del optimizer
        shutil.rmtree(d)
        return out

    def round_torch(self) -> Round:
        file = self.path("raw.pt")
        t0 = now()
        torch.save({"model": self.trained.net.state_dict(), "optimizer": self.optimizer.state_dict()}, file)
        save = since(t0)
        optimizer = self.fresh_target()
        t0 = now()
        loaded = torch.load(file, weights_only=True, map_location=workload.DEVICE)
        self.target.net.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        load = since(t0)
        self.reference.check("raw torch.load", self.target.net, optimizer.state_dict())
        del optimizer, loaded
        os.remove(file)
        return {"save": save, "load": load}

    def round_kiln(self) -> Round:
        path = self.path("kiln")
        t0 = now()
        self.trainer.save_checkpoint(path)
        save = since(t0)
        restore, first_batch = self._kiln_resume(path)
        shutil.rmtree(path)
        return {"save": save, "load": restore, "fit_to_first_batch": first_batch,
                "load peak extra MiB": {"wall": self.last_peak_extra / 2**20, "cpu": 0.0}}

    def _kiln_resume(self, path: str | None) -> tuple[dict[str, float], dict[str, float]]:
        """(the restore inside fit, fit → first batch) for a fresh Trainer and a zeroed module."""
        self.prepare_restore()
        self.target.first_batch_at = None
        clock = restore_clock(self.reference)
        trainer = kiln_trainer(self.path("resume"), max_steps=2, callbacks=[clock] if path else None)
        self.target._bench_rss_base = peak_rss_reset()
        t0 = now()
        trainer.fit(self.target, self.loader, ckpt_path=path)
        first_batch = since(t0, self.target.first_batch_at)
        if path is None:
            return {}, first_batch
        self.last_peak_extra = clock.peak_extra
        return clock.restore, minus(first_batch, clock.checking)

    def round_kiln_no_checkpoint(self) -> Round:
        return {"fit_to_first_batch": self._kiln_resume(None)[1]}

    def round_kiln_async(self) -> Round:
        from framework.checkpoint import AsyncCheckpointWriter, read_state

        path = self.path("kiln-async")
        if self.async_first_blocking_s is None:  # the first save of a writer: without, then with reserve()
            cold = AsyncCheckpointWriter()
            self.async_first_unreserved_s = self._async_save(path, cold)["wall"]
            cold.close()
            shutil.rmtree(path)
            self.async_first_blocking_s = self._async_save(path, self.writer)["wall"]
            self.writer.wait()
            shutil.rmtree(path)
        t0 = now()
        blocking = self._async_save(path, self.writer)
        self.writer.wait()
        total = since(t0)
        model_state = read_state(path, "model")
        zero_(self.target.net)
        self.target.load_state_dict(model_state)
        optimizer_state = read_state(path, "trainer")["optimizers"][0]
        self.reference.check("kiln async", self.target.net, optimizer_state)
        shutil.rmtree(path)
        return {"blocking": blocking, "total": total}

    def _async_save(self, path: str, writer: Any) -> dict[str, float]:
        """Time the loop is blocked: the save call, then (after the next forward/backward) the wait that the
        optimizer's step pre-hook would do."""
        t0 = now()
        self.trainer.save_checkpoint(path, writer=writer)
        blocked = since(t0)
        loss_of(self.trained.net, next(iter(self.loader))).backward()  # the next step's compute, overlapping
        t1 = now()
        writer.wait_for_snapshot()
        waited = since(t1)
        self.trained.zero_grad(set_to_none=True)
        return {k: blocked[k] + waited[k] for k in blocked}

    def round_durable(self) -> Round:
        """fsync=True saves (Kiln's save_checkpoint with the same states; raw safetensors + fsync) and the disk's
        own sequential write speed, page cache and fsync'd, in this round."""
        from safetensors.torch import save_file

        from framework.checkpoint import MODEL, TRAINER, save_checkpoint

        out: Round = {}
        model, opt_state = self.trained.net.state_dict(), self.optimizer.state_dict()
        t0 = now()
        save_checkpoint(self.path("durable"), {MODEL: model, TRAINER: {"optimizers": [opt_state]}}, fsync=True)
        out["kiln save fsync"] = since(t0)
        d = self.path("raw-durable")
        os.makedirs(d, exist_ok=True)
        t0 = now()
        for name, tensors in (("model", model), ("optim", flat_optimizer_tensors(opt_state))):
            save_file(tensors, os.path.join(d, f"{name}.safetensors"))
            fd = os.open(os.path.join(d, f"{name}.safetensors"), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        out["raw save fsync"] = since(t0)
        shutil.rmtree(self.path("durable"))
        shutil.rmtree(d)
        for fsync in (False, True):
            out[f"disk write{' fsync' if fsync else ''}"] = disk_write(self.path("disk"), self.nbytes, fsync)
        return out

    def round_lightning(self) -> Round:
        file = self.path("lightning.ckpt")
        t0 = now()
        self.lit_trainer.save_checkpoint(file)
        save = since(t0)
        target = self.LitTarget(seed=1)
        zero_(target.net)
        trainer = lightning_trainer(self.path("lit-resume"), max_steps=2)
        self.prepare_restore()
        t0 = now()
        trainer.fit(target, self.loader, ckpt_path=file)
        first_batch = minus(since(t0, target.first_batch_at), target.checking)
        os.remove(file)
        return {"save": save, "fit_to_first_batch": first_batch}

    def close(self) -> None:
        self.writer.close()


def run(args: argparse.Namespace, root: str) -> dict[str, Any]:
    with_lightning = is_installed("pytorch_lightning") and not args.no_lightning
    with _quiet():
        bench = Bench(args.width, args.blocks, root, with_lightning)
        runners: dict[str, Callable[[], Round]] = {
            "raw safetensors": bench.round_safetensors, "raw torch": bench.round_torch,
            "kiln sync": bench.round_kiln, "kiln async": bench.round_kiln_async,
            "kiln fit, no checkpoint": bench.round_kiln_no_checkpoint, "durable": bench.round_durable,
        }
        if with_lightning:
            runners["lightning"] = bench.round_lightning
        try:
            if not args.quick:  # warm-up: lazy imports, the checksum thread, the allocator's first touch
                bench.round_safetensors()
                bench.round_kiln()
            rounds = interleaved({name: _collected(fn) for name, fn in runners.items()}, args.repeats)
        finally:
            bench.close()
    # series[clock][measurement] = one value per round
    series = {clock: {f"{name}: {key}": [r[key][clock] for r in rs] for name, rs in rounds.items() for key in rs[0]}
              for clock in ("wall", "cpu")}
    checks = [_check("checkpoint save", "kiln sync: save", "raw safetensors: save", series, SAVE_TARGET),
              _check("checkpoint restore", "kiln sync: load", "raw safetensors: load", series, LOAD_TARGET),
              _check("async save: loop blocked", "kiln async: blocking", "kiln sync: save", series, ASYNC_TARGET)]
    wall = {name: median(v) for name, v in series["wall"].items()}
    mib_s = {name: bench.nbytes / 2**20 / wall[key] for name, key in (
        ("kiln save (page cache)", "kiln sync: save"), ("raw safetensors save (page cache)", "raw safetensors: save"),
        ("disk sequential write (page cache)", "durable: disk write"), ("kiln save fsync=True", "durable: kiln save fsync"),
        ("raw safetensors save + fsync", "durable: raw save fsync"), ("disk sequential write + fsync", "durable: disk write fsync"))}
    return {"benchmark": "checkpoint", "device": workload.DEVICE, "mib_per_s": mib_s, "parameters": bench.n_params, "state_bytes": bench.nbytes,
            "width": args.width, "blocks": args.blocks, "repeats": args.repeats, "threads": 1,
            "dir": root, "lightning": with_lightning, "states_equal": True,
            "async_first_blocking_s": bench.async_first_blocking_s,
            "async_first_unreserved_s": bench.async_first_unreserved_s,
            "median_s": {name: median(v) for name, v in series["wall"].items()},
            "cpu_median_s": {name: median(v) for name, v in series["cpu"].items()},
            "runs_s": series["wall"], "cpu_runs_s": series["cpu"], "checks": checks}


def _collected(fn: Callable[[], Round]) -> Callable[[], Round]:
    def run() -> Round:
        gc.collect()
        return fn()
    return run


def _check(name: str, measured: str, baseline: str, series: dict[str, dict[str, list[float]]],
           target: float) -> dict[str, Any]:
    wall, cpu = series["wall"], series["cpu"]
    ratio = paired_ratio(wall[measured], wall[baseline])
    return {"name": name, "measured": measured, "baseline": baseline, "measured_s": median(wall[measured]),
            "baseline_s": median(wall[baseline]), "ratio": ratio, "cpu_ratio": paired_ratio(cpu[measured], cpu[baseline]),
            "target": target, "passed": ratio <= target}


@contextlib.contextmanager
def _quiet():
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Checkpoint save/load: raw safetensors/torch vs Kiln vs Lightning.")
    parser.add_argument("--repeats", type=int, default=7, help="rotated rounds (median taken)")
    parser.add_argument("--width", type=int, default=1024, help="hidden width (1024 × 6 blocks ≈ 50M parameters)")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--dir", default=None, help="parent directory for the files (default: system temp)")
    parser.add_argument("--no-lightning", action="store_true", help="leave Lightning out even if installed")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model and optimizer live")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round: proves the script works")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.blocks, args.repeats = 64, 1, 1
    for name in ("repeats", "width", "blocks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be ≥ 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    workload.DEVICE = args.device
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="kiln-bench-ckpt-", dir=args.dir)
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
