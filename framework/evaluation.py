"""Validation, test and predict loops.

Each runs the module in eval mode under ``torch.no_grad`` through the strategy's step function, with
the precision plugin's forward context, and returns epoch-level metrics (validate/test) or the per-batch
outputs (predict).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from framework.metrics import to_floats

if TYPE_CHECKING:
    from framework.trainer import Trainer

_STEP = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
_HOOK = {"validate": "validation", "test": "test", "predict": "predict"}


def run_evaluation(t: Trainer, stage: str, feeds: list[Any]) -> list[dict[str, float]]:
    """Run ``validation_step``/``test_step`` over every loader; one dict of epoch metrics per loader."""
    module, strategy, precision = t.module, t.strategy, t.precision_plugin
    hook = _HOOK[stage]
    cbs = t._callback_list
    _check_takes_dataloader_idx(module, _STEP[stage], len(feeds))
    modes = _capture_modes(module)
    module.eval()
    t._metrics.start_stage(stage)
    t._call_hooks(f"on_{hook}_start", module_hook=False)
    t._call_hooks(f"on_{hook}_epoch_start")
    step_fn = strategy.step_function(_STEP[stage])
    batch_start, batch_end = getattr(cbs, f"on_{hook}_batch_start"), getattr(cbs, f"on_{hook}_batch_end")
    per_loader: list[dict[str, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for loader_idx, feed in enumerate(feeds):
                extra = (loader_idx,) if len(feeds) > 1 else ()
                t._metrics.dataloader_suffix = f"/dataloader_idx_{loader_idx}" if extra else ""
                for batch_idx, batch, _ in feed.epoch_batches(t.current_epoch, 0):
                    if strategy.needs_batch_transfer:
                        batch = strategy.batch_to_device(batch)
                    if precision.converts_input:
                        batch = precision.convert_input(batch)
                    if batch_start:
                        batch_start(t, module, batch, batch_idx)
                    with precision.forward_context():
                        output = step_fn(batch, batch_idx, *extra)
                    if batch_end:
                        batch_end(t, module, output, batch, batch_idx)
                per_loader.append(t._metrics.reduce_epoch())
        t._metrics.dataloader_suffix = ""
        t._call_hooks_end(f"on_{hook}_epoch_end")
        from_hooks = t._metrics.reduce_epoch()
        results = [{**metrics, **from_hooks} for metrics in per_loader] or [from_hooks]
        t._call_hooks_end(f"on_{hook}_end", module_hook=False)
    finally:
        t._metrics.dataloader_suffix = ""
        t._metrics.end_stage()
        _restore_modes(modes)
    merged: dict[str, torch.Tensor] = {}
    for metrics in results:
        merged.update(metrics)
    t._log_to_loggers(merged)
    return [to_floats(metrics) for metrics in results]


def run_predict(t: Trainer, feeds: list[Any]) -> list[Any]:
    """Run ``predict_step`` over every loader; a list of outputs per loader (flattened for one loader)."""
    module, strategy, precision = t.module, t.strategy, t.precision_plugin
    cbs = t._callback_list
    _check_takes_dataloader_idx(module, "predict_step", len(feeds))
    modes = _capture_modes(module)
    module.eval()
    t._call_hooks("on_predict_start", module_hook=False)
    t._call_hooks("on_predict_epoch_start", module_hook=False)
    step_fn = strategy.step_function("predict_step")
    all_outputs: list[list[Any]] = []
    try:
        with torch.no_grad():
            for loader_idx, feed in enumerate(feeds):
                extra = (loader_idx,) if len(feeds) > 1 else ()
                outputs: list[Any] = []
                for batch_idx, batch, _ in feed.epoch_batches(0, 0):
                    if strategy.needs_batch_transfer:
                        batch = strategy.batch_to_device(batch)
                    if precision.converts_input:
                        batch = precision.convert_input(batch)
                    if cbs.on_predict_batch_start:
                        cbs.on_predict_batch_start(t, module, batch, batch_idx)
                    with precision.forward_context():
                        output = step_fn(batch, batch_idx, *extra)
                    if cbs.on_predict_batch_end:
                        cbs.on_predict_batch_end(t, module, output, batch, batch_idx)
                    outputs.append(output)
                all_outputs.append(outputs)
        t._call_hooks_end("on_predict_epoch_end", module_hook=False)
        t._call_hooks_end("on_predict_end", module_hook=False)
    finally:
        _restore_modes(modes)
    return all_outputs[0] if len(all_outputs) == 1 else all_outputs


def _check_takes_dataloader_idx(module: torch.nn.Module, name: str, num_loaders: int) -> None:
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


def _capture_modes(module: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Every submodule's train/eval flag, so a submodule the user froze (e.g. BatchNorm) stays in eval."""
    return [(m, m.training) for m in module.modules()]


def _restore_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training
