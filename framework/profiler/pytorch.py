"""PyTorchProfiler: ``torch.profiler`` over the run, each Trainer action a ``record_function`` range.

The report is torch's operator table; with ``export_to_chrome`` a Chrome/Perfetto trace
(``<stage>-<filename>[-rank].pt.trace.json``) is written to ``dirpath`` (the log dir by default).
"""

from __future__ import annotations

import os
from typing import Any

from framework.profiler.base import Profiler

# Actions whose end advances a user-given ``schedule`` by one step (Lightning steps on the step methods).
_STEP_ACTIONS = ("run_training_batch", "validation_step", "test_step", "predict_step")


class PyTorchProfiler(Profiler):
    """Profiles CPU (and CUDA when available) operators with ``torch.profiler.profile``.

    ``group_by_input_shapes`` records shapes and groups the table by them; ``record_module_names``
    wraps every ``nn.Module`` forward in a range named after its class; ``row_limit``/``sort_by_key``/
    ``table_kwargs`` shape the table; ``emit_nvtx`` emits NVTX ranges for Nsight instead of profiling;
    further keyword arguments go to ``torch.profiler.profile`` (e.g. ``schedule``, ``with_stack``,
    ``profile_memory``).
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, filename: str | None = None,
                 group_by_input_shapes: bool = False, emit_nvtx: bool = False, export_to_chrome: bool = True,
                 row_limit: int = 20, sort_by_key: str | None = None, record_module_names: bool = True,
                 table_kwargs: dict[str, Any] | None = None, **profiler_kwargs: Any) -> None:
        super().__init__(dirpath=dirpath, filename=filename)
        if "on_trace_ready" in profiler_kwargs and export_to_chrome:
            raise ValueError("PyTorchProfiler got `on_trace_ready` and export_to_chrome=True; pass "
                             "export_to_chrome=False to handle traces yourself.")
        bad_table = set(table_kwargs or {}) & {"sort_by", "row_limit"}
        if bad_table:
            raise ValueError(f"`table_kwargs` may not set {sorted(bad_table)}; use `sort_by_key`/`row_limit`.")
        self.group_by_input_shapes = group_by_input_shapes and profiler_kwargs.get("record_shapes", True)
        self.emit_nvtx = emit_nvtx
        self.export_to_chrome = export_to_chrome
        self.row_limit = row_limit
        self.sort_by_key = sort_by_key
        self.record_module_names = record_module_names
        self.table_kwargs = dict(table_kwargs or {})
        self.profiler_kwargs = profiler_kwargs
        self.profiler: Any = None
        self.trace_path: str | None = None
        self._ranges: dict[str, Any] = {}
        self._hooks: list[Any] = []
        self._module_ranges: list[Any] = []
        self._events: Any = None

    def _start_profiler(self) -> None:
        import torch

        if self.emit_nvtx:
            self.profiler = torch.autograd.profiler.emit_nvtx(record_shapes=self.group_by_input_shapes)
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            kwargs = {"activities": activities, "record_shapes": self.group_by_input_shapes, **self.profiler_kwargs}
            self.profiler = torch.profiler.profile(**kwargs)
        self.profiler.__enter__()
        if self.record_module_names:
            from torch.nn.modules import module as nn_module

            self._hooks = [nn_module.register_module_forward_pre_hook(self._module_enter),
                           nn_module.register_module_forward_hook(self._module_exit)]

    def _module_enter(self, module: Any, args: Any) -> None:
        import torch

        scope = torch.profiler.record_function(f"[module]{type(module).__name__}")
        scope.__enter__()
        self._module_ranges.append(scope)

    def _module_exit(self, module: Any, args: Any, output: Any) -> None:
        if self._module_ranges:
            self._module_ranges.pop().__exit__(None, None, None)

    def start(self, action_name: str) -> None:
        import torch

        if self.profiler is None:
            self._start_profiler()
        scope = torch.profiler.record_function(action_name)
        scope.__enter__()
        self._ranges[action_name] = scope

    def stop(self, action_name: str) -> None:
        scope = self._ranges.pop(action_name, None)
        if scope is None:
            raise ValueError(f"Attempting to stop recording an action ({action_name}) which was never started.")
        scope.__exit__(None, None, None)
        if "schedule" in self.profiler_kwargs and action_name.endswith(_STEP_ACTIONS):
            self.profiler.step()

    def _stop_profiler(self) -> None:
        if self.profiler is None:
            return
        for scope in reversed(list(self._ranges.values()) + self._module_ranges):
            scope.__exit__(None, None, None)
        self._ranges, self._module_ranges = {}, []
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.profiler.__exit__(None, None, None)
        if not self.emit_nvtx:
            if self.export_to_chrome and self.dirpath:
                parts = [p for p in (self._stage, self.filename or "trace") if p]
                if self._local_rank is not None:
                    parts.append(str(self._local_rank))
                os.makedirs(self.dirpath, exist_ok=True)
                self.trace_path = os.path.join(self.dirpath, "-".join(parts) + ".pt.trace.json")
                self.profiler.export_chrome_trace(self.trace_path)
            self._events = self.profiler.key_averages(group_by_input_shape=self.group_by_input_shapes)
        self.profiler = None

    def summary(self) -> str:
        self._stop_profiler()
        if self._events is None:
            return ""
        sort_by = self.sort_by_key or ("cuda_time_total" if any(
            getattr(e, "device_time_total", 0) for e in self._events) else "cpu_time_total")
        table = self._events.table(sort_by=sort_by, row_limit=self.row_limit, **self.table_kwargs)
        return self._stats_to_str({"records": table})

    def teardown(self, stage: str | None) -> None:
        self._stop_profiler()  # the trace is written; the table waits for describe()
        super().teardown(stage)

    def reset(self) -> None:
        self._events = None
