"""Bit-exact DDP resume at any world size: give a resumed DDP wrapper the bucket layout of the saved run.

A new ``DistributedDataParallel`` reduces with an initial bucket layout (parameters in reverse
registration order) and, after its first synchronised backward (its second under ``static_graph``,
whose first one reduces everything at the end), rebuilds its buckets in the order gradients became
ready. A bucket is all-reduced as one flat buffer, and where an element sits in that buffer decides in
which order the ranks' values are summed — ``a+b == b+a`` exactly, but ``(a+b)+c`` and ``a+(b+c)`` differ.
So a resumed run that reduced its first step with the initial layout while the uninterrupted run used
the rebuilt one drifts at 3+ ranks (``tests/scripts/ddp_rebuild_raw.py`` shows it with raw torch).

``BucketOrder`` records, during the first synchronised backwards of a run, the order in which gradients
became ready (what DDP rebuilds from); checkpoints store it. On resume, before the first real step, it
replays that order with synthetic backwards through the new wrapper: each makes every recorded gradient
ready in turn from a graph built on the parameters alone (``p.reshape(-1)[0] * 0``), so no model code
runs — no forward hooks, RNG draws, BatchNorm updates or logs — and gradients are reset to ``None``
afterwards. DDP then rebuilds into the saved layout before the first real step. The cost is one or two
all-reduces of zeros at resume; steps are unchanged. ``find_unused_parameters=True`` (without
``static_graph``) never rebuilds, so there is nothing to record. The one thing the replay can touch is a
gradient hook on a parameter (``Tensor.register_hook``): it sees a zero gradient once per replayed backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

STATE_KEY = "ddp_ready_orders"


class BucketOrder:
    """Record the gradient-ready order of a DDP wrapper's first synchronised backwards; replay it later."""

    def __init__(self, ddp: nn.Module, *, static_graph: bool, find_unused_parameters: bool) -> None:
        self.ddp = ddp
        self.params = [p for p in ddp.module.parameters() if p.requires_grad]
        self.sparse = {id(p) for m in ddp.module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                       and m.sparse for p in m.parameters(recurse=False)}  # DDP expects sparse gradients there
        self.rebuilds = static_graph or not find_unused_parameters  # when DDP rebuilds its buckets
        self.needed = 2 if static_graph else 1  # synchronised backwards whose order decides the rebuild
        self.orders: list[list[int]] = []  # one ready order per synchronised backward, up to ``needed``
        self._ready: list[int] = []
        self._handles: list[Any] = []
        if self.rebuilds:
            self._handles = [p.register_post_accumulate_grad_hook(lambda _, i=i: self._ready.append(i))
                             for i, p in enumerate(self.params)]

    @property
    def recording(self) -> bool:
        return bool(self._handles)

    def after_backward(self, synchronised: bool) -> None:
        """Keep the ready order of a synchronised backward (no_sync micro-batches do not count for DDP)."""
        if synchronised:
            self.orders.append(_last_occurrences(self._ready))
            if len(self.orders) >= self.needed:
                self.stop()
        self._ready = []

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {STATE_KEY: [list(order) for order in self.orders]} if self.rebuilds else {}

    def replay(self, state: dict[str, Any]) -> bool:
        """Bring a wrapper that has not synchronised yet to the saved run's point: one synthetic backward
        per recorded order (collective: every rank calls it with rank 0's saved state). True if it ran."""
        orders = [[int(i) for i in order] for order in state.get(STATE_KEY, []) if order]
        if not self.rebuilds or not orders or self.orders:
            return False
        if any(i < 0 or i >= len(self.params) for order in orders for i in order):
            raise ValueError(f"The checkpoint's DDP bucket order names parameters beyond this model's "
                             f"{len(self.params)}; resume with the model that saved it.")
        self.stop()
        dispatcher = self.ddp.module
        with torch.enable_grad():
            for order in orders:
                self.ddp(_ReadyInOrder([self.params[i] for i in order], self.sparse)).backward()
        for p in dispatcher.parameters():
            p.grad = None
        self.orders = orders
        return True


class _ReadyInOrder:
    """A step for the dispatcher: a zero scalar whose backward readies each parameter's gradient in turn."""

    def __init__(self, params: list[nn.Parameter], sparse: set[int]) -> None:
        self.params = params
        self.sparse = sparse

    def __call__(self) -> torch.Tensor:
        total = None
        for p in reversed(self.params):  # autograd runs the most recently built branch first
            if id(p) in self.sparse:  # a sparse gradient, as the embedding's own backward gives
                term = nn.functional.embedding(torch.zeros(1, dtype=torch.long, device=p.device), p, sparse=True)
                term = term.sum() * 0
            else:
                term = p.reshape(-1)[0] * 0
            total = term if total is None else term + total
        return total


def _last_occurrences(order: list[int]) -> list[int]:
    """A parameter ready twice (re-entrant backward) counts where it was last ready, as DDP's rebuild does."""
    last = {i: n for n, i in enumerate(order)}
    return [i for n, i in enumerate(order) if last[i] == n]
