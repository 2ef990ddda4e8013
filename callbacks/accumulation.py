"""GradientAccumulation: the rule for where accumulation windows end and how losses are weighted.

Windows are K consecutive batches of an epoch, counted from the epoch's first batch; the final batch of
an epoch always closes a window, even a short one. Every micro-batch loss is divided by the *actual*
length of its window, so each optimizer step sees the window's mean gradient — K batches of B equal one
batch of K·B, the short tail window included. When the epoch length is unknown (iterable loaders) the
tail is only discovered at its last batch; its losses were divided by K, so the gradients are rescaled
by K/actual before the step, which gives the same result.
"""

from __future__ import annotations

from typing import Any

from callbacks.base import Callback


class GradientAccumulation(Callback):
    """Accumulate gradients over ``accumulate_grad_batches`` batches: an int, or ``{epoch: k}`` schedule."""

    def __init__(self, accumulate_grad_batches: int | dict[int, int] = 1) -> None:
        self.schedule = _validate(accumulate_grad_batches)

    def factor(self, epoch: int) -> int:
        """Window length K in effect for ``epoch``."""
        k = 1
        for start, value in self.schedule:
            if epoch >= start:
                k = value
        return k

    def plan(self, epoch: int, num_batches: int | None) -> WindowPlan:
        """The window rule for one epoch with ``num_batches`` batches (None when unknown)."""
        return WindowPlan(self.factor(epoch), num_batches)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": [list(item) for item in self.schedule]}


class WindowPlan:
    """Window boundaries and loss divisors for one epoch."""

    __slots__ = ("k", "num_batches")

    def __init__(self, k: int, num_batches: int | None) -> None:
        self.k = k
        self.num_batches = num_batches

    def window(self, batch_idx: int, is_last: bool) -> tuple[bool, int]:
        """``(closes_window, loss_divisor)`` for the batch at ``batch_idx``."""
        k = self.k
        sync = is_last or (batch_idx + 1) % k == 0
        n = self.num_batches
        if n is None:
            return sync, k
        start = batch_idx - batch_idx % k
        return sync, min(k, n - start)

    def tail_correction(self, batch_idx: int) -> float | None:
        """Gradient factor for a short final window whose losses were divided by K (unknown length only)."""
        if self.num_batches is not None:
            return None
        actual = batch_idx % self.k + 1
        return None if actual == self.k else self.k / actual


def _validate(value: int | dict[int, int]) -> list[tuple[int, int]]:
    fix = "use an int >= 1 or a dict {epoch: k} with int epochs >= 0 and ints k >= 1, e.g. {0: 1, 4: 2}"
    if isinstance(value, bool):
        raise TypeError(f"accumulate_grad_batches={value!r} is not valid; {fix}.")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"accumulate_grad_batches={value!r} is not valid; {fix}.")
        return [(0, value)]
    if isinstance(value, dict) and value:
        items = sorted(value.items())
        for epoch, k in items:
            if (not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 or not isinstance(k, int)
                    or isinstance(k, bool) or k < 1):
                raise ValueError(f"accumulate_grad_batches={value!r} is not valid at {epoch!r}: {k!r}; {fix}.")
        return items
    raise TypeError(f"accumulate_grad_batches={value!r} is not valid; {fix}.")
