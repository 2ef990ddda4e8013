"""ModelSummary: print the module's layer table (``framework.model_summary``) when fit starts, on rank 0.

``Trainer(enable_model_summary=True)`` (the default) installs one with ``max_depth=1`` unless the user
passed their own; ``ModelSummary(max_depth=0)`` or ``enable_model_summary=False`` turns it off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from framework.hooks import Callback

if TYPE_CHECKING:
    from framework.module import TrainModule
    from framework.trainer import Trainer


class ModelSummary(Callback):
    """Prints the summary at ``on_fit_start``: -1 lists every submodule, 1 direct children, 0 nothing."""

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            raise ValueError(f"`max_depth` can be -1, 0 or > 0, got {max_depth!r}.")
        if summarize_kwargs:
            raise TypeError(
                f"ModelSummary got {sorted(summarize_kwargs)}, which only Lightning's RichModelSummary styles use; "
                "Kiln prints a plain-text table. Drop these arguments."
            )
        self._max_depth = max_depth
        self.last_summary: str | None = None

    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        if not self._max_depth:
            return
        from framework.model_summary import summarize

        # Built on every rank: with example_input_array the forward may be collective (FSDP, DeepSpeed).
        self.last_summary = str(summarize(module, max_depth=self._max_depth))
        if trainer.is_global_zero:
            print(self.last_summary, flush=True)

