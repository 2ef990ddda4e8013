"""TensorBoardLogger: scalars and hyperparameters in an event file written on the calling thread; the model graph
and whatever user code writes to ``experiment`` through torch's ``SummaryWriter`` (see ``event_file.py``).

Arguments and layout follow Lightning's: ``save_dir/name/version_N[/sub_dir]``, ``hparams.yaml`` beside
the event files, the HPARAMS tab with an ``hp_metric`` placeholder (``default_hp_metric``). tensorboard
is imported on the first write, not when this module is imported.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from framework.loggers.base import (
    HPARAMS_FILE,
    VersionedDirLogger,
    add_prefix,
    convert_params,
    flatten_params,
    is_rank_zero,
    to_float,
    write_hparams_yaml,
)
from framework.loggers.event_file import EventFile

_SUMMARY_WRITER_ARGS = frozenset({"comment", "purge_step", "max_queue", "flush_secs", "filename_suffix"})


class TensorBoardLogger(VersionedDirLogger):
    """Writes TensorBoard event files under ``save_dir/name/version_N[/sub_dir]``.

    ``log_graph`` traces ``module.example_input_array`` once at fit start; ``default_hp_metric`` logs
    ``hp_metric = -1`` with the hyperparameters so the HPARAMS tab shows them (log a real ``hp_metric``
    later to replace it); ``prefix`` is put before every metric name as ``prefix-name``; further keyword
    arguments go to ``SummaryWriter`` (e.g. ``flush_secs``, ``max_queue``).
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(save_dir, name, version, sub_dir)
        for arg, value in (("log_graph", log_graph), ("default_hp_metric", default_hp_metric)):
            if not isinstance(value, bool):
                raise TypeError(f"`{arg}` must be a bool, got {value!r}.")
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a str, got {prefix!r}.")
        unknown = sorted(set(kwargs) - _SUMMARY_WRITER_ARGS)  # checked here: the SummaryWriter is made on demand
        if unknown:
            raise TypeError(f"TensorBoardLogger got unexpected keyword arguments {unknown}; the extra arguments go to "
                            f"torch's SummaryWriter, which takes {sorted(_SUMMARY_WRITER_ARGS)} (log_dir is the "
                            "logger's own).")
        self._log_graph = log_graph
        self._default_hp_metric = default_hp_metric
        self._prefix = prefix
        self._kwargs = kwargs
        self._experiment: Any = None
        self._events: EventFile | None = None  # Kiln's own records (scalars, hparams)
        self._summary_pb2: Any = None
        self.hparams: dict[str, Any] = {}

    @property
    def experiment(self) -> Any:
        """The ``torch.utils.tensorboard.SummaryWriter`` (None on ranks other than 0), created on first use."""
        if self._experiment is None and is_rank_zero():
            from torch.utils.tensorboard import SummaryWriter

            self._experiment = SummaryWriter(log_dir=self._local_dir(), **self._kwargs)
        return self._experiment

    def _event_file(self) -> EventFile:
        if self._events is None:
            from tensorboard.compat.proto import summary_pb2

            self._summary_pb2 = summary_pb2
            self._events = EventFile(self._local_dir(), flush_secs=self._kwargs.get("flush_secs", 120),
                                     filename_suffix=self._kwargs.get("filename_suffix", ""),
                                     purge_step=self._kwargs.get("purge_step"))
        return self._events

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not is_rank_zero() or not metrics:
            return
        events = self._event_file()
        step = None if step is None else int(step)
        values = []
        for key, value in add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            if isinstance(value, Mapping):
                self.experiment.add_scalars(key, {k: to_float(f"{key}/{k}", v) for k, v in value.items()}, step)
            else:
                values.append(self._summary_pb2.Summary.Value(tag=key, simple_value=to_float(key, value)))
        if values:  # one event for all scalars: what add_scalar writes, at a fifth of its cost per call
            events.add_summary(self._summary_pb2.Summary(value=values), step)

    def log_hyperparams(self, params: Any, metrics: Any = None) -> None:
        """Write ``hparams.yaml`` and the HPARAMS-tab record; ``metrics`` (dict or number) name the hp metrics."""
        if not is_rank_zero():
            return
        self.hparams.update(convert_params(params))
        write_hparams_yaml(os.path.join(self._local_dir(), HPARAMS_FILE), self.hparams)
        if metrics is None:
            metrics = {"hp_metric": -1} if self._default_hp_metric else None
        elif not isinstance(metrics, Mapping):
            metrics = {"hp_metric": metrics}
        if not metrics:
            return
        from torch.utils.tensorboard.summary import hparams

        self.log_metrics(metrics, 0)
        flat = {k: _tb_value(v) for k, v in flatten_params(self.hparams).items()}
        events = self._event_file()
        for summary in hparams(flat, {k: to_float(k, v) for k, v in metrics.items()}):
            events.add_summary(summary)

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Trace ``model`` with ``input_array`` (default ``model.example_input_array``) into the graph tab."""
        if not self._log_graph or not is_rank_zero():
            return
        import torch

        input_array = getattr(model, "example_input_array", None) if input_array is None else input_array
        if input_array is None:
            warnings.warn("TensorBoardLogger(log_graph=True) could not log the graph: set "
                          "`module.example_input_array` or pass `input_array`.", UserWarning, stacklevel=2)
            return
        if not isinstance(input_array, (torch.Tensor, tuple)):
            warnings.warn(f"TensorBoardLogger(log_graph=True) could not log the graph: the input has type "
                          f"{type(input_array).__name__}; use a tensor or a tuple of the forward's positional "
                          "arguments.", UserWarning, stacklevel=2)
            return
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            input_array = _to_device(input_array, device)
        self.experiment.add_graph(model, input_array)

    def save(self) -> None:
        if not is_rank_zero():
            return
        if self._events is not None:
            self._events.flush()
        if self._experiment is not None:
            self._experiment.flush()
        written = self._staging or self._experiment is not None or self._events is not None
        hparams_file = os.path.join(self._local_dir(), HPARAMS_FILE) if written else None
        if hparams_file and not os.path.exists(hparams_file):
            write_hparams_yaml(hparams_file, self.hparams)
        self._upload()

    def finalize(self, status: str) -> None:
        if not is_rank_zero():
            return
        if self._events is not None:
            self._events.close()
            self._events = None  # a later write (e.g. trainer.test after fit) opens a new event file
        if self._experiment is not None:
            self._experiment.flush()
            self._experiment.close()
            self._experiment = None
        self.save()


def _tb_value(value: Any) -> Any:
    """A value TensorBoard's hparams plugin accepts: bool/int/float/str as is, tensors as numbers, else repr."""
    if isinstance(value, (bool, int, float, str)):
        return value
    try:
        import torch

        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return repr(value)


def _to_device(value: Any, device: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value.to(device) if hasattr(value, "to") else value
