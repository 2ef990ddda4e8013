"""Jobs for tests/test_ddp_buckets.py: DDP resume compared bit for bit with an uninterrupted run at 3+ ranks.

The model is the one of issue #19's table: a small GPT (2 blocks, embedding tied to the output head)
with AdamW, a cosine LR schedule, ``accumulate_grad_batches=3`` and ``gradient_clip_val=1.0``. Each case
trains ``STEPS`` optimizer steps uninterrupted, then again stopped at step ``STOP`` (a checkpoint step)
and resumed from ``"last"`` by a new Trainer, module and DDP wrapper, and compares the final parameters.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from callbacks import ModelCheckpoint
from framework import Trainer, TrainModule, seed_everything

VOCAB, DIM, SEQ, SAMPLES, STEPS, STOP = 64, 32, 8, 120, 8, 4  # 3 and 4 ranks stop mid-epoch


class Tokens(Dataset):
    """Sequence ``i`` is a pure function of ``i``."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.randint(0, VOCAB, (SEQ + 1,), generator=torch.Generator().manual_seed(index))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.view(*h.shape[:2], 4, DIM // 4).transpose(1, 2) for t in self.qkv(self.norm1(h)).chunk(3, -1))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(h.shape))
        return h + self.mlp(self.norm2(h))


class TinyGPT(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.position = nn.Parameter(torch.zeros(SEQ, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.forwards = 0  # forward hook calls: a resume must not run the model more than the batches it trains
        self.norm.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        h = self.embed(batch[:, :-1]) + self.position
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.norm(h))
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / 16)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(root: str, max_steps: int, ddp: dict[str, Any], accumulate: int, resume: bool = False) -> tuple[TinyGPT, Any]:
    """``ddp``: DDPStrategy's arguments, or ``{"deepspeed_stage": n}`` for DeepSpeed's ZeRO stage n."""
    from strategies import DDPStrategy, DeepSpeedStrategy

    seed_everything(3)
    module = TinyGPT()
    strategy = DeepSpeedStrategy(stage=ddp["deepspeed_stage"]) if "deepspeed_stage" in ddp else DDPStrategy(**ddp)
    trainer = Trainer(strategy=strategy, devices=int(os.environ["WORLD_SIZE"]), max_steps=max_steps,
                      accumulate_grad_batches=accumulate, gradient_clip_val=1.0, default_root_dir=root,
                      callbacks=[ModelCheckpoint(every_n_train_steps=2, save_last=True)], logger=False,
                      enable_progress_bar=False)
    trainer.fit(module, DataLoader(Tokens(), batch_size=2, shuffle=True), ckpt_path="last" if resume else None)
    assert trainer.global_step == max_steps
    return module.float(), trainer


def parameter_sum(module: nn.Module) -> float:
    return sum(p.detach().double().sum().item() for p in module.parameters())


def assert_identical(a: nn.Module, b: nn.Module, about: str) -> None:
    different = [name for (name, p), q in zip(a.named_parameters(), b.parameters()) if not torch.equal(p, q)]
    assert not different, f"{about}: {parameter_sum(a)!r} != {parameter_sum(b)!r} ({different})"


def resume_job(root: str, cases: list[tuple[dict[str, Any], int]], check_sensitivity: bool) -> None:
    """For each ``(ddp_kwargs, accumulate)``: uninterrupted == stopped at STOP + resumed, bit for bit.

    ``check_sensitivity``: also resume the first case with the bucket-order replay switched off and
    require a difference, so this job would notice a regression (at 2 ranks sums commute: no difference)."""
    world = int(os.environ["WORLD_SIZE"])
    for n, (ddp, accumulate) in enumerate(cases):
        about = f"world={world} ddp={ddp} accumulate={accumulate}"
        reference, straight = fit(os.path.join(root, f"{n}-reference"), STEPS, ddp, accumulate)
        interrupted = os.path.join(root, f"{n}-interrupted")
        first, _ = fit(interrupted, STOP, ddp, accumulate)
        resumed, trainer = fit(interrupted, STEPS, ddp, accumulate, resume=True)
        assert_identical(resumed, reference, about)
        # the bucket-order replay runs no model code and logs nothing: same forwards, same logged loss
        assert first.forwards + resumed.forwards == reference.forwards, about
        assert torch.equal(trainer.callback_metrics["train_loss"], straight.callback_metrics["train_loss"]), about
        if int(os.environ["RANK"]) == 0:
            print(f"{about}: uninterrupted and resumed both {parameter_sum(reference)!r}", flush=True)
        if check_sensitivity and n == 0:
            from strategies.ddp_buckets import BucketOrder

            replay, BucketOrder.replay = BucketOrder.replay, lambda self, state: False
            try:
                unfixed = os.path.join(root, f"{n}-unfixed")
                fit(unfixed, STOP, ddp, accumulate)
                drifted, _ = fit(unfixed, STEPS, ddp, accumulate, resume=True)
            finally:
                BucketOrder.replay = replay
            assert not all(torch.equal(p, q) for p, q in zip(drifted.parameters(), reference.parameters())), (
                f"{about}: without the bucket-order replay the resumed run should differ at {world} ranks")
