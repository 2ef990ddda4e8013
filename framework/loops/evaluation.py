"""Validation, test and predict loops, in Lightning's hook order.

One loop serves the three stages: the module in eval mode (each submodule's own flag restored after),
no autograd (``torch.inference_mode`` where the strategy allows it, else ``no_grad``), batches moved by
the transfer hooks, steps run through the strategy under the precision plugin's forward context.
validate/test return one dict of epoch metrics per dataloader; predict returns the step outputs.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from framework.loops.transfer import LoopTransfer

if TYPE_CHECKING:
    from framework.hooks import HookCaller
    from framework.trainer import Trainer

STEP = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
HOOK = {"validate": "validation", "test": "test", "predict": "predict"}


class EvaluationLoop:
    """Runs one evaluation stage over its dataloaders (``max_batches`` caps each: the sanity check)."""

    def __init__(self, trainer: Trainer, hooks: HookCaller, stage: str, feeds: list[Any], *, in_fit: bool = False,
                 max_batches: int | None = None, return_predictions: bool = True) -> None:
        self.t, self.hooks, self.stage, self.feeds = trainer, hooks, stage, feeds
        self.in_fit, self.max_batches, self.return_predictions = in_fit, max_batches, return_predictions
        self.name = HOOK[stage]

    def run(self) -> list[Any]:
        t, hooks, name, module = self.t, self.hooks, self.name, self.t.module
        check_takes_dataloader_idx(module, STEP[self.stage], len(self.feeds))
        modes = [(m, m.training) for m in module.modules()]  # a submodule the user froze stays in eval
        predicting = self.stage == "predict"
        if self.in_fit:
            hooks.module_hook("on_validation_model_zero_grad")
            t._fit_validating = True
        if predicting:
            t.predict_loop.epoch_batch_indices = []
        module.eval()
        hooks.module_hook(f"on_{name}_model_eval")
        try:
            with _no_autograd(t):  # the stage's accumulators are made and changed only in here
                if not predicting:
                    t._metrics.start_stage(self.stage)
                hooks.both(f"on_{name}_start")
                hooks.both(f"on_{name}_epoch_start")
                per_loader = [self._run_loader(idx, feed) for idx, feed in enumerate(self.feeds)]
                t._metrics.dataloader_suffix = ""  # what the epoch-end hooks log belongs to no one dataloader
                hooks.both(f"on_{name}_epoch_end")
                if predicting:
                    results = per_loader
                else:
                    from_hooks = t._metrics.reduce_epoch()
                    results = [{**metrics, **from_hooks} for metrics in per_loader] or [from_hooks]
                hooks.both(f"on_{name}_end")
                if not predicting:
                    t._metrics.end_stage()
        finally:
            t._metrics.dataloader_suffix = ""
            t._fit_validating = False
            for m, training in modes:
                m.training = training
        if self.stage != "test" and self.stage != "predict":
            hooks.module_hook("on_validation_model_train")
        elif self.stage == "test":
            hooks.module_hook("on_test_model_train")
        if predicting:
            return (results[0] if len(results) == 1 else results) if self.return_predictions else []
        return results

    def _run_loader(self, loader_idx: int, feed: Any) -> Any:
        t, hooks, module = self.t, self.hooks, self.t.module
        several = len(self.feeds) > 1
        extra = (loader_idx,) if several else ()
        metrics = t._metrics
        metrics.dataloader_suffix = f"/dataloader_idx_{loader_idx}" if several else ""
        dataloader_idx = loader_idx if several else None
        transfer = LoopTransfer(module, t.datamodule, t.strategy, t.precision_plugin)
        step_fn = hooks.step_function(STEP[self.stage])
        precision = t.precision_plugin
        name = self.name
        batch_start, batch_end = hooks.overridden(f"on_{name}_batch_start"), hooks.overridden(f"on_{name}_batch_end")
        outputs: list[Any] = []
        keep = self.stage == "predict" and self.return_predictions
        if self.stage == "predict":
            metrics.current_fx = "predict_step"  # self.log there is refused, as in Lightning
        indices = t.predict_loop if self.stage == "predict" and t.predict_loop.track(feed.dataloader) else None
        for batch_idx, batch, _ in feed.epoch_batches(t.current_epoch, 0):
            if self.max_batches is not None and batch_idx >= self.max_batches:
                break
            if indices is not None:
                indices.next_batch()
            batch = transfer(batch, loader_idx)
            metrics.on_batch_start(batch, dataloader_idx)
            if batch_start:
                hooks.both(f"on_{name}_batch_start", batch, batch_idx, *extra)
            with precision.forward_context():
                output = step_fn(batch, batch_idx, *extra)
            if batch_end:
                hooks.both(f"on_{name}_batch_end", output, batch, batch_idx, *extra)
            metrics.on_batch_end()
            if metrics.step_values:  # values logged with on_step=True in an evaluation step (Lightning writes them)
                t.metric_logging.log(metrics.step_values, step=batch_idx)
            if keep:
                outputs.append(output)
        if self.stage == "predict":
            metrics.current_fx = None
            return outputs
        metrics.epoch_end_reached()
        return metrics.reduce_epoch()


class _no_autograd:
    """``torch.inference_mode`` when the Trainer asks for it and the strategy allows it, else ``no_grad``.

    Collectives over gloo and XLA/FSDP tensors do not work with inference tensors (Lightning falls back the
    same way), so multi-process and XLA runs use ``no_grad``."""

    def __init__(self, trainer: Trainer) -> None:
        use_inference = (trainer.inference_mode and trainer.world_size == 1
                         and trainer.strategy.root_device.type not in ("xla", "meta"))
        self.context = torch.inference_mode() if use_inference else torch.no_grad()

    def __enter__(self) -> None:
        self.context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.context.__exit__(*exc)


def check_takes_dataloader_idx(module: torch.nn.Module, name: str, num_loaders: int) -> None:
    """With several loaders the step gets ``dataloader_idx``: say so up front instead of a bare arity error."""
    if num_loaders < 2:
        return
    try:
        params = inspect.signature(getattr(module, name)).parameters.values()
    except (TypeError, ValueError):  # not introspectable: let the call itself decide
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise TypeError(f"{type(module).__name__}.{name}() got {num_loaders} dataloaders but takes no "
                        f"dataloader_idx; define {name}(self, batch, batch_idx, dataloader_idx=0).")
