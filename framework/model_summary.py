"""Model summary: a layer table with parameter counts (and in/out sizes), as Lightning prints at fit start.

``summarize(module, max_depth)`` builds it; ``str()`` of the result is the table. With
``module.example_input_array`` set, one no-grad forward in eval mode records each layer's input and output
shapes (training flags are restored afterwards).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

UNKNOWN_SIZE = "?"
NOT_APPLICABLE = "n/a"
_UNITS = [" ", "K", "M", "B", "T"]


class LayerSummary:
    """One row: a submodule's type, parameter count, train/eval mode, and shapes seen in one forward."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.in_size: Any = UNKNOWN_SIZE
        self.out_size: Any = UNKNOWN_SIZE
        self._handle = None
        if not isinstance(module, torch.jit.ScriptModule):
            self._handle = module.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, _: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = (*args, *kwargs.values())
        self.in_size = _shape(inputs[0] if len(inputs) == 1 else inputs)
        self.out_size = _shape(out)
        self.detach_hook()  # first call only: a reused layer reports its first use

    def detach_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def layer_type(self) -> str:
        return type(self.module).__name__

    @property
    def num_parameters(self) -> int:
        return _count(self.module.parameters())

    @property
    def training(self) -> bool:
        return self.module.training


class ModelSummary:
    """The summary of ``model``: ``max_depth`` 1 lists direct children, -1 every submodule, 0 none."""

    def __init__(self, model: nn.Module, max_depth: int = 1) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            raise ValueError(f"`max_depth` can be -1, 0 or > 0, got {max_depth!r}.")
        self._model = model
        self._max_depth = max_depth
        self._layers = self._summarize()

    def _summarize(self) -> dict[str, LayerSummary]:
        if self._max_depth == 0:
            named: list[tuple[str, nn.Module]] = []
        elif self._max_depth == 1:
            named = list(self._model.named_children())
        else:
            named = list(self._model.named_modules())[1:]
        layers = {name: LayerSummary(module) for name, module in named}
        try:
            if getattr(self._model, "example_input_array", None) is not None:
                self._forward_example_input()
        finally:
            for layer in layers.values():
                layer.detach_hook()
        if self._max_depth >= 1:
            layers = {k: v for k, v in layers.items() if k.count(".") < self._max_depth}
        return layers

    def _forward_example_input(self) -> None:
        model = self._model
        inputs = model.example_input_array
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            inputs = _to(inputs, device)
        modes = [(m, m.training) for m in model.modules()]
        trainer = getattr(model, "_trainer", None)
        plugin = getattr(trainer, "precision_plugin", None)
        context = plugin.forward_context() if plugin is not None else contextlib.nullcontext()
        model.eval()
        try:
            with torch.no_grad(), context:
                if isinstance(inputs, (list, tuple)):
                    model(*inputs)
                elif isinstance(inputs, dict):
                    model(**inputs)
                else:
                    model(inputs)
        finally:
            for module, training in modes:
                module.training = training

    # ---- Lightning's attribute names ------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    @property
    def layer_types(self) -> list[str]:
        return [layer.layer_type for layer in self._layers.values()]

    @property
    def in_sizes(self) -> list[Any]:
        return [layer.in_size for layer in self._layers.values()]

    @property
    def out_sizes(self) -> list[Any]:
        return [layer.out_size for layer in self._layers.values()]

    @property
    def param_nums(self) -> list[int]:
        return [layer.num_parameters for layer in self._layers.values()]

    @property
    def training_modes(self) -> list[bool]:
        return [layer.training for layer in self._layers.values()]

    @property
    def total_training_modes(self) -> dict[str, int]:
        modes = [m.training for m in self._model.modules()][1:]  # the root module itself is not counted
        return {"train": modes.count(True), "eval": modes.count(False)}

    @property
    def total_parameters(self) -> int:
        return _count(self._model.parameters())

    @property
    def trainable_parameters(self) -> int:
        return _count(p for p in self._model.parameters() if p.requires_grad)

    @property
    def model_size(self) -> float:
        """Megabytes the parameters take in their current dtypes."""
        return sum(p.numel() * p.element_size() for p in self._model.parameters() if not _is_uninitialized(p)) / 1e6

    def summary_data(self) -> list[tuple[str, list[str]]]:
        """The table's columns as ``(header, cells)``."""
        columns = [
            (" ", [str(i) for i in range(len(self._layers))]),
            ("Name", self.layer_names),
            ("Type", self.layer_types),
            ("Params", [human_readable_count(n) for n in self.param_nums]),
            ("Mode", ["train" if mode else "eval" for mode in self.training_modes]),
        ]
        with_sizes = getattr(self._model, "example_input_array", None) is not None
        if with_sizes:
            columns += [("In sizes", [str(s) for s in self.in_sizes]), ("Out sizes", [str(s) for s in self.out_sizes])]
        leftover = self.total_parameters - sum(self.param_nums)
        if leftover > 0 and self._layers:  # parameters owned by the root module itself
            extra = [" ", "other params", NOT_APPLICABLE, human_readable_count(leftover), NOT_APPLICABLE]
            extra += [NOT_APPLICABLE, NOT_APPLICABLE] if with_sizes else []
            columns = [(header, [*cells, cell]) for (header, cells), cell in zip(columns, extra)]
        return columns

    def __str__(self) -> str:
        return format_summary_table(self.summary_data(), self.total_parameters, self.trainable_parameters,
                                    self.model_size, self.total_training_modes)

    __repr__ = __str__


def summarize(model: nn.Module, max_depth: int = 1) -> ModelSummary:
    """The summary of ``model`` (``str()`` it for the table)."""
    return ModelSummary(model, max_depth=max_depth)


def format_summary_table(columns: list[tuple[str, list[str]]], total: int, trainable: int, size_mb: float,
                         modes: dict[str, int]) -> str:
    """Lightning's layout: ``|``-separated columns, a rule, then the totals block."""
    n_rows = len(columns[0][1])
    widths = [max([len(header), *(len(str(c)) for c in cells)]) if n_rows else len(header) for header, cells in columns]
    rule = "-" * (sum(widths) + 3 * (len(columns) + 1))
    lines = [" | ".join(f"{header:<{w}}" for (header, _), w in zip(columns, widths)), rule]
    for i in range(n_rows):
        lines.append(" | ".join(f"{str(cells[i]):<{w}}" for (_, cells), w in zip(columns, widths)))
    lines += [
        rule,
        f"{human_readable_count(trainable):<10}Trainable params",
        f"{human_readable_count(total - trainable):<10}Non-trainable params",
        f"{human_readable_count(total):<10}Total params",
        f"{size_mb:<10,.3f}Total estimated model params size (MB)",
        f"{modes['train']:<10}Modules in train mode",
        f"{modes['eval']:<10}Modules in eval mode",
    ]
    return "\n".join(lines)


def human_readable_count(number: int | float) -> str:
    """``123`` → ``"123  "``, ``1234`` → ``"1.2 K"``, ``2e6`` → ``"2.0 M"``, beyond trillions ``"5,000 T"``."""
    if number < 0:
        raise ValueError(f"human_readable_count needs a number >= 0, got {number!r}.")
    digits = int(math.floor(math.log10(number)) + 1) if number > 0 else 1
    groups = min(int(math.ceil(digits / 3)), len(_UNITS))
    scaled = number * 10 ** (-3 * (groups - 1))
    if groups == 1 or scaled >= 100:
        return f"{int(scaled):,d} {_UNITS[groups - 1]}"
    return f"{scaled:,.1f} {_UNITS[groups - 1]}"


def _is_uninitialized(p: torch.Tensor) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter)


def _count(params: Any) -> int:
    return sum(p.numel() for p in params if not _is_uninitialized(p))


def _shape(value: Any) -> Any:
    if hasattr(value, "shape"):
        return list(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shape(v) for v in value]
    return UNKNOWN_SIZE


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
