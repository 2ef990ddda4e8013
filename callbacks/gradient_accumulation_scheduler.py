"""GradientAccumulationScheduler: Lightning's per-epoch accumulation schedule, on Kiln's exact windows.

It *is* a ``GradientAccumulation`` (``{epoch: k}`` schedule), so the Trainer uses its window rule: every
optimizer step sees the window's mean gradient, short tail windows included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from callbacks.accumulation import GradientAccumulation

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer


class GradientAccumulationScheduler(GradientAccumulation):
    """``scheduling={epoch: k}``: from ``epoch`` on, accumulate ``k`` batches (1 before the first key).

    Do not also pass ``Trainer(accumulate_grad_batches=...)``; manual optimization cannot use it.
    """

    def __init__(self, scheduling: dict[int, int]) -> None:
        if not isinstance(scheduling, dict) or not scheduling:
            raise TypeError(f"`scheduling` must be a non-empty dict {{epoch: accumulate_grad_batches}}, "
                            f"got {scheduling!r}.")
        for epoch, k in scheduling.items():
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise IndexError(f"Epoch key {epoch!r} in `scheduling` must be an int >= 0.")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise IndexError(f"Accumulation factor {k!r} for epoch {epoch} must be an int >= 1.")
        scheduling = dict(sorted(scheduling.items()))
        if 0 not in scheduling:
            scheduling = {0: 1, **scheduling}
        super().__init__(scheduling)
        self.scheduling = scheduling
        self.epochs = sorted(scheduling)

    def going_to_accumulate_grad_batches(self) -> bool:
        """True when some epoch accumulates more than one batch."""
        return any(k > 1 for k in self.scheduling.values())

    def get_accumulate_grad_batches(self, epoch: int) -> int:
        """The window length in effect for ``epoch``."""
        return self.factor(epoch)

    def on_train_start(self, trainer: Trainer, module: TrainModule) -> None:
        if not module.automatic_optimization and self.going_to_accumulate_grad_batches():
            raise RuntimeError("GradientAccumulationScheduler does not work with manual optimization "
                               "(automatic_optimization=False): accumulate in training_step yourself by stepping "
                               "the optimizer every k batches.")
