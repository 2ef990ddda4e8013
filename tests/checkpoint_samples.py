"""A small model with tied weights and a full trainer-like state, saved as a checkpoint (tests/test_checkpoint*.py)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from framework.checkpoint import MODEL, TRAINER, rank_state_name, save_checkpoint


class TiedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = torch.nn.Linear(4, 4)
        self.linear2 = torch.nn.Linear(4, 4)
        self.linear2.weight = self.linear1.weight
        self.norm = torch.nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.norm(self.linear1(x)))


def trained(seed: int = 0):
    torch.manual_seed(seed)
    model = TiedNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def states(model, opt, sched):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = {"optimizers": [opt.state_dict()], "schedulers": [sched.state_dict()], "scaler": scaler.state_dict(),
               "loop": {"epoch": 1, "global_step": 3, "batch_idx": 2, "skipped_steps": 0},
               "callbacks": {"ModelCheckpoint{'monitor': None}": {"best": float("inf"), "kept": ("a", "b")}}}
    rank = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "data": {"epoch": 1, "position": 16, "seed": 7}}
    return {MODEL: model.state_dict(), TRAINER: trainer, rank_state_name(0): rank}


def save(path, step=3, safe=True, **kw):
    model, opt, sched = trained(step)
    return save_checkpoint(str(path), states(model, opt, sched), {"epoch": 1, "global_step": step},
                           safe_serialization=safe, **kw)


def damage(path, rel, how):
    file = os.path.join(path, rel)
    data = bytearray(open(file, "rb").read())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "flip-last":  # in the tensor data, away from the header
        data[-1] ^= 0x01
    else:
        data = data[: len(data) // 2]
    open(file, "wb").write(data)
