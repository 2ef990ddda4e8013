"""The collector's training state as plain data (tensors, str, numbers, bools, lists, dicts), and back.

Resuming mid-epoch must continue the running accumulators exactly: their tensors are stored as they
are (dtype and bits), the batch-size weights as integers, and every logged torchmetrics.Metric's
state under the module attribute that holds it (Lightning's ``metric_attribute``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from framework.metrics.entry import Entry

if TYPE_CHECKING:
    from framework.metrics.collector import MetricCollector

FORMAT_VERSION = 1
_OPTION_NAMES = ("prog_bar", "logger", "on_step", "on_epoch", "reduce", "enable_graph", "add_dataloader_idx",
                 "dataloader_idx", "metric_attribute", "sync", "rank_zero_only")


def collector_state(collector: MetricCollector) -> dict[str, Any]:
    entries = []
    seen_metrics: set[int] = set()
    for entry in collector._stages["train"].values():
        item: dict[str, Any] = {
            "fx": entry.fx, "name": entry.name, "options": dict(zip(_OPTION_NAMES, entry.options)),
            "is_tensor": entry.is_tensor, "acc": _copy(entry.acc), "weight": entry.weight,
            "step": _copy(entry.step), "has_reset": entry.has_reset, "reported": entry.reported, "metric": None,
        }
        if entry.metric is not None:
            if entry.metric_attribute is None:
                raise ValueError(f"The torchmetrics.Metric logged as {entry.name!r} has no metric_attribute, so a "
                                 "checkpoint could not restore it; log it with metric_attribute='<attribute name>'.")
            item["metric"] = {"attribute": entry.metric_attribute,
                              "state": None if id(entry.metric) in seen_metrics else _metric_state(entry.metric)}
            seen_metrics.add(id(entry.metric))
        entries.append(item)
    return {"version": FORMAT_VERSION, "entries": entries, "stepping": collector._stepping if collector.stage ==
            "train" else bool(collector._saved and collector._saved[2]),
            "callback": {k: _copy(v) for k, v in collector._callback.items()},
            "progress_bar": {k: _copy(v) for k, v in collector._pbar.items()}}


def restore_collector(collector: MetricCollector, state: dict[str, Any], module: torch.nn.Module | None) -> None:
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise ValueError(f"MetricCollector.load_state_dict got {type(state).__name__} without version "
                         f"{FORMAT_VERSION}; pass what MetricCollector.state_dict() returned.")
    entries = collector._stages["train"]
    entries.clear()
    for item in state["entries"]:
        options = tuple(item["options"][name] for name in _OPTION_NAMES)
        opts = dict(zip(_OPTION_NAMES, options))
        entry = Entry(item["fx"], item["name"], opts["dataloader_idx"], options, on_step=opts["on_step"],
                      on_epoch=opts["on_epoch"], reduce=opts["reduce"], logger=opts["logger"],
                      prog_bar=opts["prog_bar"], enable_graph=opts["enable_graph"], sync=opts["sync"],
                      add_dataloader_idx=opts["add_dataloader_idx"], metric_attribute=opts["metric_attribute"],
                      is_tensor=item["is_tensor"])
        entry.acc, entry.weight, entry.step = _copy(item["acc"]), int(item["weight"]), _copy(item["step"])
        entry.has_reset, entry.reported = bool(item["has_reset"]), bool(item["reported"])
        if item["metric"] is not None:
            entry.metric = _find_metric(module, item["metric"]["attribute"], item["name"])
            if item["metric"]["state"] is not None:
                _load_metric_state(entry.metric, item["metric"]["state"])
        dl = opts["dataloader_idx"] if opts["add_dataloader_idx"] else None
        entries[(item["fx"], item["name"], dl)] = entry
    if collector.stage == "train":
        collector._entries = entries
    collector._stepping = bool(state["stepping"])
    collector._callback = {k: _copy(v) for k, v in state["callback"].items()}
    collector._pbar = {k: _copy(v) for k, v in state["progress_bar"].items()}


def _copy(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else value.detach().clone()


def _metric_state(metric: Any) -> dict[str, Any]:
    state = {name: ([_copy(t) for t in value] if isinstance(value, list) else _copy(value))
             for name, value in metric.metric_state.items()}
    return {"tensors": state, "update_count": int(metric._update_count)}


def _load_metric_state(metric: Any, saved: dict[str, Any]) -> None:
    for name, value in saved["tensors"].items():
        setattr(metric, name, [_copy(t) for t in value] if isinstance(value, list) else _copy(value))
    metric._update_count = int(saved["update_count"])
    metric._computed = None


def _find_metric(module: torch.nn.Module | None, attribute: str, name: str) -> Any:
    if module is None:
        raise ValueError(f"The checkpoint's metrics include the torchmetrics.Metric logged as {name!r}; pass the "
                         "module to MetricCollector.load_state_dict(state, module=...) so it can be restored.")
    try:
        return module.get_submodule(attribute)
    except AttributeError:
        raise ValueError(f"The checkpoint logged a torchmetrics.Metric as {name!r} from attribute {attribute!r}, "
                         f"which {type(module).__name__} does not have; keep the metric under that attribute.") from None
