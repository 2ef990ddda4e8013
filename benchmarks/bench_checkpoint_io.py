"""Checkpoint I/O: Kiln save/load vs raw safetensors on the same tensors, in one process.

Model: ~50M parameters (Linear/LayerNorm blocks) + AdamW state after one step (~600 MB).
Each figure is the median of ``--repeats`` runs; raw and Kiln runs alternate so page-cache and
allocator state affect both alike, and on a shared, busy machine the median of the per-repeat
(paired, back-to-back) ratios is printed as well, being far less sensitive to load drift; process CPU
time (all threads) is printed next to each wall time. Targets (DESIGN.md §6): save and load <= 1.10x raw,
and the blocking part of an async save <= 10% of a synchronous save.

Async: ``snapshot(..., module=, optimizers=)`` returns after copying what a forward pass may change; the
parameters and optimizer state are copied in the background ("snapshot complete" = the call plus
``wait_for_snapshot()``, i.e. the most an optimizer step right after the save could wait).

Load baselines: safetensors' ``load_file`` maps the file lazily and reads no data, while Kiln's
load reads and checksums every byte. So the load ratio is measured end to end ("restore": load,
then ``load_state_dict`` into the model and optimizer, identical on both sides); the lazy and the
eager (``backend="pread"``) raw figures are printed for reference.

    python benchmarks/bench_checkpoint_io.py [--repeats 7] [--dir /path/on/target/disk]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.checkpoint import MODEL, TRAINER, AsyncCheckpointWriter, read_state, save_checkpoint  # noqa: E402


def build(width: int = 1024, blocks: int = 6) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width), torch.nn.LayerNorm(width)]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{pid}.{k}": v for pid, s in opt.state_dict()["state"].items() for k, v in s.items()}


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``fn()``."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def run(repeats: int, root: str) -> dict[str, float]:
    model, opt = build()
    n_params = sum(p.numel() for p in model.parameters())
    raw_model, raw_opt = model.state_dict(), optimizer_tensors(opt)
    nbytes = sum(t.numel() * t.element_size() for t in [*raw_model.values(), *raw_opt.values()])
    print(f"model: {n_params / 1e6:.1f}M parameters, {len(raw_model) + len(raw_opt)} tensors, "
          f"{nbytes / 2**20:.0f} MiB with AdamW state; dir={root}; torch threads={torch.get_num_threads()}")
    raw_dir, kiln_dir = os.path.join(root, "raw"), os.path.join(root, "epoch=0-step=1")
    states = lambda: {MODEL: model.state_dict(), TRAINER: {"optimizers": [opt.state_dict()]}}  # noqa: E731

    def raw_save() -> None:
        os.makedirs(raw_dir, exist_ok=True)
        save_file(raw_model, os.path.join(raw_dir, "model.safetensors"))
        save_file(raw_opt, os.path.join(raw_dir, "optim.safetensors"))

    def raw_save_fsync() -> None:
        raw_save()
        for name in ("model", "optim"):
            fd = os.open(os.path.join(raw_dir, f"{name}.safetensors"), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    def kiln_save(fsync: bool = False) -> None:
        save_checkpoint(kiln_dir, states(), {"global_step": 1}, fsync=fsync)

    def raw_restore() -> None:
        model.load_state_dict(load_file(os.path.join(raw_dir, "model.safetensors")))
        for k, v in load_file(os.path.join(raw_dir, "optim.safetensors")).items():
            raw_opt[k].copy_(v)

    def kiln_restore(verify: bool = True) -> None:
        model.load_state_dict(read_state(kiln_dir, MODEL, verify=verify))
        opt.load_state_dict(read_state(kiln_dir, TRAINER, verify=verify)["optimizers"][0])

    def raw_load(**kw: Any) -> None:
        for name in ("model", "optim"):
            load_file(os.path.join(raw_dir, f"{name}.safetensors"), **kw)

    def kiln_load() -> None:
        read_state(kiln_dir, MODEL)
        read_state(kiln_dir, TRAINER)

    writer = AsyncCheckpointWriter()
    first = timed(lambda: writer.snapshot(states(), module=model, optimizers=[opt]))
    first_complete = timed(writer.wait_for_snapshot)
    print(f"  first async snapshot: call {first[0] * 1e3:.1f} ms, complete after "
          f"{(first[0] + first_complete[0]) * 1e3:.1f} ms (buffers allocated by the background copy)")
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def snapshot_complete() -> None:
        writer.snapshot(states(), module=model, optimizers=[opt])
        writer.wait_for_snapshot()

    for _ in range(repeats):
        for name, fn in [("raw save", raw_save), ("kiln save", kiln_save),
                         ("async snapshot call (blocking)", lambda: writer.snapshot(states(), module=model,
                                                                                    optimizers=[opt])),
                         ("async snapshot complete", snapshot_complete),
                         ("kiln save fsync=True", lambda: kiln_save(True)), ("raw save fsync", raw_save_fsync)]:
            writer.wait_for_snapshot()
            wall, spent = timed(fn)
            results.setdefault(name, []).append(wall)
            cpu.setdefault(name, []).append(spent)
        for name, fn in [("raw restore", raw_restore), ("kiln restore", kiln_restore),
                         ("kiln restore verify=False", lambda: kiln_restore(False)), ("raw load_file (lazy mmap)", raw_load),
                         ("raw load_file pread", lambda: raw_load(backend="pread")), ("kiln load", kiln_load)]:
            wall, spent = timed(fn)
            results.setdefault(name, []).append(wall)
            cpu.setdefault(name, []).append(spent)
        shutil.rmtree(raw_dir)
        shutil.rmtree(kiln_dir)
    writer.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    for k, v in med.items():
        print(f"  {k:32s} median {v * 1e3:7.1f} ms  CPU {statistics.median(cpu[k]) * 1e3:7.1f} ms"
              f"  min {min(results[k]) * 1e3:7.1f} ms"
              f"   (runs: {' '.join(f'{x * 1e3:.0f}' for x in results[k])})")
    pairs = {
        "save: kiln / raw save_file": ("kiln save", "raw save"),
        "restore: kiln / raw load_file (+ load_state_dict both)": ("kiln restore", "raw restore"),
        "load: kiln (verified) / raw load_file pread (eager)": ("kiln load", "raw load_file pread"),
        "async: snapshot call / sync kiln save": ("async snapshot call (blocking)", "kiln save"),
        "async: snapshot complete / sync kiln save": ("async snapshot complete", "kiln save"),
        "durable: kiln save fsync / raw save + fsync": ("kiln save fsync=True", "raw save fsync"),
    }
    ratios = {}
    print(f"  {'ratio':58s} medians  paired (median of per-repeat ratios)  CPU (paired)")
    for label, (a, b) in pairs.items():
        paired = statistics.median(x / y for x, y in zip(results[a], results[b]))
        cpu_paired = statistics.median(x / y for x, y in zip(cpu[a], cpu[b]))
        ratios[label] = med[a] / med[b]
        print(f"  {label:58s} {ratios[label]:5.2f}x   {paired:5.2f}x   {cpu_paired:5.2f}x")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=None, help="parent directory for the files (default: system temp)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="kiln-bench-ckpt-", dir=args.dir)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine_info

    print(", ".join(f"{k}={v}" for k, v in machine_info().items()))
    try:
        run(args.repeats, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
