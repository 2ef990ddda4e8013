"""RNGCapture: save every rank's random number generator states and restore them on resume."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from callbacks.base import Callback
from framework.rng import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer


class RNGCapture(Callback):
    """Saves and restores, per rank, python ``random``, numpy's global generator, torch CPU and every
    CUDA/XPU/MPS/XLA generator in use, so a resumed run draws the numbers the uninterrupted run drew.

    The rule: ``state_dict()`` captures the generators at the moment it is called (when the checkpoint
    is saved). After ``load_state_dict()`` the captured state is restored at the start of the next
    training epoch (``on_train_epoch_start``), i.e. before the first batch after the resume point is
    fetched; the Trainer installs this callback first so that other callbacks' epoch-start hooks run
    after the restore. The resumed run is then exact when nothing draws random numbers between the
    save and the next batch fetch that the resumed run does not also draw after the restore: true for
    a save after a batch (mid-epoch resume) as long as epoch-start hooks draw nothing, and for a save
    at an epoch's end as long as nothing in between (validation, end-of-epoch hooks) draws.
    Data order and dataloader-worker seeds do not depend on these generators (``prepare_dataloader``
    gives each loader its own), and the data position is saved by the loop's ``DataFeed``.

    ``per_rank_state``: each rank stores its own state (in its own checkpoint file).
    """

    per_rank_state = True

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Loaded but not yet restored: the loaded state is still the one this run will continue from.
        return capture_rng_state() if self._pending is None else self._pending

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"state_dict={type(state_dict).__name__} is not a dict; pass what RNGCapture.state_dict() returned."
            )
        self._pending = state_dict

    def on_train_epoch_start(self, trainer: Trainer, module: TrainModule) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            restore_rng_state(pending)
