"""The checkpoint benchmark's workload and measuring tools (used by bench_checkpoint.py).

The model (Linear/LayerNorm blocks, ~50M parameters at width 1024 × 6 blocks) with its AdamW state, the raw
safetensors readers it is compared with, the bitwise check every restore goes through, the disk's own
sequential write, peak-RSS marks, the Kiln/Lightning modules and Trainers the rounds use, and the report table.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

import torch
from common import format_table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LR = 1e-3
DEVICE = "cpu"  # set by bench_checkpoint.py --device (bench_gpu.py runs it with --device cuda)
Stamp = tuple[float, float]  # (wall, process CPU) seconds
Round = dict[str, dict[str, float]]  # one contender's round: measurement -> {"wall": s, "cpu": s}


def now() -> Stamp:
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # device work issued so far belongs to the span that issued it
    return time.perf_counter(), time.process_time()


def since(start: Stamp, end: Stamp | None = None) -> dict[str, float]:
    """Wall and CPU seconds (CPU: this process, all threads — steadier on a shared machine)."""
    end = end or now()
    return {"wall": end[0] - start[0], "cpu": end[1] - start[1]}


def minus(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a[k] - b[k] for k in a}


# ---- the workload ------------------------------------------------------------------------------
def build_net(width: int, blocks: int, seed: int = 0) -> nn.Sequential:
    """Linear/LayerNorm blocks: width 1024 × 6 blocks ≈ 50.4M parameters (~600 MB with AdamW state)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, 4 * width), nn.Linear(4 * width, width), nn.LayerNorm(width)]
    return nn.Sequential(*layers)


def make_loader(width: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(8, width, generator=g)), batch_size=2)


def loss_of(net: nn.Module, batch: Any) -> torch.Tensor:
    return net(batch[0]).pow(2).mean()


def flat_optimizer_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{pid}.{key}": value for pid, s in state["state"].items() for key, value in s.items()}


def unflatten_optimizer_tensors(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return state


def load_file_eager(path: str) -> dict[str, torch.Tensor]:
    """safetensors ``load_file`` that reads every byte now (pread), as Kiln's reader does."""
    from safetensors.torch import load_file

    try:
        return load_file(path, device=DEVICE, backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend argument: copy out of the map
        return {k: v.clone() for k, v in load_file(path, device=DEVICE).items()}


def load_file_lazy(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path, device=DEVICE)


class Mismatch(AssertionError):
    pass


class Reference:
    """The saved state, to check every restore against (bitwise)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model.state_dict()
        self.optimizer = optimizer.state_dict()

    def check(self, who: str, model: nn.Module, optimizer_state: dict[str, Any]) -> None:
        for key, value in model.state_dict().items():
            if not torch.equal(value, self.model[key]):
                raise Mismatch(f"{who}: restored model tensor {key!r} differs from the saved one")
        ref, got = self.optimizer["state"], optimizer_state["state"]
        if sorted(ref) != sorted(got):
            raise Mismatch(f"{who}: restored optimizer state has params {sorted(got)[:5]}..., saved {sorted(ref)[:5]}...")
        for pid, entries in ref.items():
            for key, value in entries.items():
                if not torch.equal(torch.as_tensor(got[pid][key]), torch.as_tensor(value)):
                    raise Mismatch(f"{who}: restored optimizer state {pid}.{key} differs from the saved one")


def disk_write(file: str, nbytes: int, fsync: bool) -> dict[str, float]:
    """Sequential write of ``nbytes`` (the physical limit the savers are compared with): blocks reserved
    up front, then page-aligned 256 KiB writes of one cache-resident buffer — the fastest pattern measured here
    (16 MiB writes were ~2x slower into the page cache)."""
    chunk = os.urandom(256 * 2**10)
    t0 = now()
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    count = max(1, nbytes // len(chunk))
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, count * len(chunk))
    for _ in range(count):
        os.write(fd, chunk)
    if fsync:
        os.fsync(fd)
    os.close(fd)
    spent = since(t0)
    os.remove(file)
    return spent


def peak_rss_reset() -> int:
    """Reset the peak-RSS mark (Linux ``clear_refs``) and return the current RSS in bytes (0 if unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return 0


def peak_rss_since(base: int) -> float:
    """Bytes by which the peak RSS rose above ``base`` since :func:`peak_rss_reset`."""
    return max(0.0, float(_status_kb("VmHWM") * 1024 - base)) if base else 0.0


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def trim_heap() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def zero_(net: nn.Module) -> None:
    """Wipe the restore target, so that a restore that loads nothing fails the check."""
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()


# ---- Kiln and Lightning ----------------------------------------------------------------------------
def step_module(base: type, width: int, blocks: int, reference: Reference | None = None) -> type:
    """The model as a Kiln TrainModule or a LightningModule; notes when its first training step starts.

    With ``reference``, Lightning's ``on_train_start`` (after it restored the optimizer) checks the restore.
    """

    class Net(base):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.net = build_net(width, blocks, seed)
            self.first_batch_at: Stamp | None = None
            self.checking = {"wall": 0.0, "cpu": 0.0}  # time spent checking, not part of fit → first batch

        def on_train_start(self):
            if reference is not None:
                start = now()
                reference.check("lightning restore", self.net, self.trainer.optimizers[0].state_dict())
                self.checking = since(start)

        def training_step(self, batch, batch_idx):
            if self.first_batch_at is None:
                self.first_batch_at = now()
            return loss_of(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    return Net


def restore_clock(reference: Reference) -> Any:
    """A Kiln callback bracketing the checkpoint restore: ``setup`` runs right before it, ``on_fit_start`` after."""
    from callbacks import Callback

    class RestoreClock(Callback):
        def __init__(self) -> None:
            self.start: Stamp | None = None
            self.restore: dict[str, float] = {}
            self.checking: dict[str, float] = {}

        def setup(self, trainer, module, stage):
            self.start = now()

        def on_fit_start(self, trainer, module):
            stop = now()
            self.peak_extra = peak_rss_since(getattr(module, "_bench_rss_base", 0))
            self.restore = since(self.start, stop)
            reference.check("kiln restore", module.net, trainer.optimizers[0].state_dict())
            self.checking = since(stop)

    return RestoreClock()


def kiln_trainer(root: str, max_steps: int, callbacks: list | None = None) -> Any:
    from framework import DistributedState, Trainer

    DistributedState._reset_state()  # each Trainer in this process starts from a clean topology
    return Trainer(enable_model_summary=False, accelerator=DEVICE, max_steps=max_steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, default_root_dir=root, callbacks=callbacks)


def lightning_trainer(root: str, max_steps: int) -> Any:
    import pytorch_lightning as pl

    return pl.Trainer(accelerator=DEVICE, devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


# ---- the report ----------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> str:
    rows = [(name, 1e3 * value, 1e3 * min(result["runs_s"][name]), 1e3 * result["cpu_median_s"][name])
            for name, value in result["median_s"].items() if "MiB" not in name]
    text = (f"{result['parameters'] / 1e6:.1f}M parameters, {result['state_bytes'] / 2**20:.0f} MiB with AdamW state, "
            f"on {result['device']}, median of {result['repeats']} rotated rounds, 1 thread, files in {result['dir']}\n\n")
    text += format_table(["contender: measurement", "median ms", "min ms", "CPU ms"], rows)
    text += "\n\n" + format_table(
        ["target", "kiln ms", "baseline", "baseline ms", "ratio", "CPU ratio", "target", "verdict"],
        [(c["name"], 1e3 * c["measured_s"], c["baseline"], 1e3 * c["baseline_s"], c["ratio"], c["cpu_ratio"],
          f"≤ {c['target']}", "met" if c["passed"] else "MISSED") for c in result["checks"]])
    if result["async_first_blocking_s"] is not None:
        text += (f"\n\nThe first async save of a writer blocked {result['async_first_blocking_s'] * 1e3:.0f} ms with "
                 f"its buffers reserved ahead (AsyncCheckpointWriter.reserve), "
                 f"{(result.get('async_first_unreserved_s') or 0) * 1e3:.0f} ms without (fresh buffers).")
    text += "\n\nPeak resident memory a restore adds (MiB, medians; the state is " \
            f"{result['state_bytes'] / 2**20:.0f} MiB):\n" + "\n".join(
        f"  {name.replace(' peak extra MiB', ''):38s} {value:8.0f}" for name, value in result["median_s"].items()
        if "MiB" in name)
    text += "\n\nThroughput (MiB/s of state, medians):\n" + "\n".join(
        f"  {name:38s} {value:8.0f}" for name, value in result["mib_per_s"].items())
    return text + "\nEvery restore equals the saved state bit for bit. CPU = process CPU time, all threads."
