"""Raw torch (no Kiln): does a DDP resume differ bit-wise at 3+ ranks because of the bucket rebuild?

Run: ``torchrun --standalone --nproc_per_node 3 tests/scripts/ddp_rebuild_raw.py``

A small tied-embedding language model trains 6 steps with DDP (gloo, AdamW): once uninterrupted, and
once stopped after step 3 and resumed in a new DDP wrapper from the saved model + optimizer state
(what a checkpoint restores). The resumed wrapper reduces its first backward with DDP's initial bucket
layout (parameters in reverse registration order, one bucket) and only then rebuilds buckets in the
order gradients became ready; the uninterrupted run already reduces with the rebuilt layout at step 4.
Variants: ``warmup`` runs one zero-weighted synchronised backward of the model in the new wrapper before
step 4 (the rebuild then happens before the first real step); ``replay`` runs synthetic backwards (no model
code) that make gradients ready in the order recorded in the first run (two for ``static_graph``, whose
first iteration reduces all at once and whose rebuild follows its second). Rank 0 prints one line per
DDP configuration and the layouts.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

VOCAB, DIM, SEQ, BATCH, STEPS, STOP = 50, 32, 8, 4, 6, 3


class TinyLM(nn.Module):
    """Embedding tied to the output head: the head's gradient arrives first, the embedding's last."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
                                      for _ in range(2)))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train(ddp: DDP, optimizer: torch.optim.Optimizer, steps: range) -> None:
    rank = dist.get_rank()
    for step in steps:
        x, y = batch(step, rank)
        loss = nn.functional.cross_entropy(ddp(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def layout(ddp: DDP) -> list[list[int]]:
    """Parameter indices (registration order) of each bucket, in reduction order."""
    index = {id(p): i for i, p in enumerate(ddp.module.parameters())}
    return [[index[id(p)] for p in bucket.parameters()] for bucket in ddp.reducer._get_zeros_like_grad_buckets()]


def zero_weighted_backward(ddp: DDP) -> None:
    x, _ = batch(0, dist.get_rank())
    (ddp(x).sum() * 0).backward()
    for p in ddp.module.parameters():
        p.grad = None


def record_ready_order(model: nn.Module, order: list[int]) -> list:
    """Append each parameter's index to ``order`` when its gradient is accumulated (remove the handles after)."""
    return [p.register_post_accumulate_grad_hook(lambda p, i=i: order.append(i))
            for i, p in enumerate(model.parameters())]


def replay(ddp: DDP, order: list[int], iterations: int) -> None:
    """Synchronised backwards through the wrapper that make the gradients ready in ``order`` (no model code)."""
    params = list(ddp.module.parameters())

    def synthetic(*_):
        total = None
        for i in reversed(order):  # the last term built is the first one differentiated
            term = params[i].reshape(-1)[0] * 0
            total = term if total is None else term + total
        return total

    forward = ddp.module.forward
    ddp.module.forward = synthetic
    try:
        for _ in range(iterations):
            ddp().backward()
    finally:
        ddp.module.forward = forward
    for p in params:
        p.grad = None


def run(variant: str, **ddp_kwargs) -> tuple[float, list[list[int]], list[list[int]]]:
    torch.manual_seed(0)
    model = TinyLM()
    ddp = DDP(model, **ddp_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    order: list[int] = []
    handles = record_ready_order(model, order)
    train(ddp, optimizer, range(2))
    for handle in handles:
        handle.remove()
    n = len(list(model.parameters()))
    synced_order = order[n:] if ddp_kwargs.get("static_graph") else order[:n]  # static: the 2nd backward
    if variant == "uninterrupted":
        train(ddp, optimizer, range(2, STEPS))
        return sum(p.double().sum().item() for p in model.parameters()), layout(ddp), []
    train(ddp, optimizer, range(2, STOP + 1))
    saved_model, saved_optim = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    before = layout(ddp)
    torch.manual_seed(123)  # a new process: other initial weights, overwritten by the checkpoint
    model = TinyLM()
    model.load_state_dict(saved_model)
    ddp = DDP(model, **ddp_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(saved_optim)
    if variant == "warmup":
        zero_weighted_backward(ddp)
    if variant == "replay":
        replay(ddp, synced_order, 2 if ddp_kwargs.get("static_graph") else 1)
    train(ddp, optimizer, range(STOP + 1, STEPS))
    return sum(p.double().sum().item() for p in model.parameters()), before, layout(ddp)


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    for kwargs in ({}, {"bucket_cap_mb": 1000}, {"find_unused_parameters": True}, {"static_graph": True}):
        results = {v: run(v, **kwargs) for v in ("uninterrupted", "resumed", "warmup", "replay")}
        if dist.get_rank() == 0:
            print(f"world={world} ddp_kwargs={kwargs} uninterrupted={results['uninterrupted'][0]!r} " + " ".join(
                f"{v}={results[v][0]!r} (bit-exact: {results[v][0] == results['uninterrupted'][0]})"
                for v in ("resumed", "warmup", "replay")))
            print(f"  layout at the stop: {results['resumed'][1]}  layout of the new wrapper after its first "
                  f"step: {results['resumed'][2]}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
