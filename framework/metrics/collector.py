"""Collecting what ``self.log`` receives and turning it into step, epoch, callback and progress-bar metrics.

Lightning's model, with O(1) memory per key: every ``(hook, name, dataloader_idx)`` key has one
``Entry`` holding its latest step value and a running epoch accumulator updated in place on the value's
device (no host transfer on the hot path). Epoch values are computed when the epoch ends — or when a
callback asks for ``callback_metrics`` after the batches — and synchronised across ranks with
``sync_dist``. Training and each evaluation stage have their own entries, so a validation run inside a
training epoch leaves the training accumulators alone.

The loops tell the collector where they are: ``current_fx`` (the hook being run; it selects
Lightning's defaults and refusals), ``on_batch_start(batch, dataloader_idx)`` (the batch whose size
weights epoch means), ``epoch_end_reached()`` / ``reduce_epoch()`` and ``start_stage``/``end_stage``.
Where a loop does not set ``current_fx``, the hook is implied by the stage (``training_step`` /
``validation_step`` / ``test_step``, or the stage's ``on_*_epoch_end`` inside ``epoch_level()``).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from framework.exceptions import MisconfigurationException
from framework.metrics.batch_size import infer_batch_size
from framework.metrics.entry import REDUCTIONS, Entry, is_metric, parse_reduce_fx
from framework.metrics.rules import EPOCH, RULES, resolve_levels

_TRAIN = "train"
_STEP_FX = {"train": "training_step", "validate": "validation_step", "test": "test_step", "predict": "predict_step"}
_EPOCH_FX = {"train": "on_train_epoch_end", "validate": "on_validation_epoch_end", "test": "on_test_epoch_end",
             "predict": "on_predict_epoch_end"}
_FLOATS = (torch.float32, torch.float64)
_warned: set[str] = set()


class MetricCollector:
    """Holds the logged metrics of the running stage; see the module docstring for the protocol."""

    def __init__(self) -> None:
        self.stage = _TRAIN
        self.current_fx: str | None = None  # set by the loops around every hook they call
        self.dataloader_idx: int | None = None
        self.epoch_hook = False  # inside epoch_level(): the implied hook is the stage's epoch-end hook
        self.reduce: Any = None  # the strategy's all_reduce(tensor, op) when world_size > 1, else None
        self._entries: dict[tuple, Entry] = {}
        self._stages: dict[str, dict[tuple, Entry]] = {_TRAIN: self._entries}
        self._stepping = False  # between the first batch and the epoch's end (Lightning's step/epoch view)
        self._batch: Any = None
        self._batch_size: int | None = None
        self._saved: tuple | None = None
        self._keep_restored = False
        self._levels: dict[tuple, tuple[bool, bool, bool]] = {}
        # What callbacks and the progress bar see: every key's newest value, kept across stages and epochs.
        self._callback: dict[str, torch.Tensor] = {}
        self._pbar: dict[str, torch.Tensor] = {}
        self._known: dict[tuple, tuple] = {}  # log()'s call options -> (entry, step, in_steps, mean), see log

    # ---- called from TrainModule.log -------------------------------------------------------------------
    def log(self, name: str, value: Any, prog_bar: bool = False, logger: bool | None = None,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
            enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any = None,
            add_dataloader_idx: bool = True, batch_size: int | None = None, metric_attribute: str | None = None,
            rank_zero_only: bool = False, device: torch.device | None = None) -> None:
        """Record one value; the arguments (in Lightning's order) mean what they mean in ``LightningModule.log``.

        ``device`` places plain numbers (the module's device). Hot path: a few µs, no host transfer.
        """
        options_key = (self.current_fx, self.stage, self.epoch_hook, self.dataloader_idx, name, prog_bar, logger,
                       on_step, on_epoch, reduce_fx, enable_graph, sync_dist, sync_dist_group, add_dataloader_idx,
                       metric_attribute, rank_zero_only)
        cacheable = type(value) is torch.Tensor and value.ndim == 0 and value.dtype in _FLOATS
        if cacheable:  # the hot path: a float scalar under a key and options seen before
            try:
                known = self._known.get(options_key)
            except TypeError:  # an unhashable reduce_fx or group: the full path below
                known = cacheable = None
            if known is not None:
                entry, step, in_steps, mean = known
                if in_steps:
                    self._stepping = True
                if not enable_graph:  # a parameter, buffer or no_grad result may change in place: copy it
                    value = value.detach().clone() if step and value.is_leaf else value.detach()
                sync = bool(sync_dist) and self.reduce is not None and not rank_zero_only
                self._record(entry, value, step, mean, batch_size, sync, sync_dist_group)
                return
        fx = self.current_fx
        if fx is None:
            fx = (_EPOCH_FX if self.epoch_hook else _STEP_FX).get(self.stage, "training_step")
        levels = self._levels.get((fx, on_step, on_epoch))
        if levels is None:
            levels = (*resolve_levels(fx, name, on_step, on_epoch), RULES[fx] is not EPOCH)
            self._levels[(fx, on_step, on_epoch)] = levels
        step, epoch, in_steps = levels
        if in_steps:
            self._stepping = True
        if add_dataloader_idx and "/dataloader_idx_" in name:
            raise MisconfigurationException(f"self.log({name!r}, ...): the name already holds '/dataloader_idx_'; Kiln adds that "
                             "suffix itself. Drop it from the name, or pass add_dataloader_idx=False.")
        try:
            reduce = REDUCTIONS[reduce_fx]
        except (KeyError, TypeError):
            reduce = parse_reduce_fx(name, reduce_fx)
        if logger is None:
            logger = True
        sync = bool(sync_dist) and self.reduce is not None and not rank_zero_only
        dl = self.dataloader_idx
        key = (fx, name, dl if add_dataloader_idx else None)
        options = (prog_bar, logger, step, epoch, reduce, enable_graph, add_dataloader_idx, dl, metric_attribute,
                   sync, rank_zero_only)
        entry = self._entries.get(key)

        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"self.log({name!r}, ...) got a tensor of shape {tuple(value.shape)}; log a tensor "
                                 "with a single element (e.g. value.mean()), or log_dict for several values.")
            snapshot = value.is_leaf  # a parameter, buffer or no_grad result: it may change in place later
            if not enable_graph:
                value = value.detach()
            if value.ndim:
                value = value.reshape(())
            dtype = value.dtype
            if dtype is not torch.float32 and dtype is not torch.float64:
                value = _to_float(name, fx, value)
                snapshot = False
            is_tensor = True
        elif isinstance(value, numbers.Number):
            value = torch.full((), float(value), dtype=_default_float(), device=device)
            snapshot, is_tensor = False, True
        elif is_metric(value):
            is_tensor = snapshot = False
        else:
            raise ValueError(f"self.log({name!r}, value={value!r}): a {type(value).__name__} cannot be logged; log a "
                             "number, a single-element tensor or a torchmetrics.Metric.")

        if entry is None:
            entry = self._entries[key] = Entry(
                fx, name, dl, options, on_step=step, on_epoch=epoch, reduce=reduce, logger=logger, prog_bar=prog_bar,
                enable_graph=enable_graph, sync=sync, add_dataloader_idx=add_dataloader_idx,
                metric_attribute=metric_attribute, is_tensor=is_tensor)
        elif entry.options != options or entry.is_tensor != is_tensor:
            raise MisconfigurationException(f"self.log({name!r}, ...) was called twice in {fx}() with different options (or a "
                             "different kind of value); log one name with one set of options per hook, or use "
                             "another name.")
        entry.group = sync_dist_group
        if not is_tensor:
            entry.update_metric(value)
            return
        mean = epoch and reduce == "mean"
        if cacheable:  # the options resolved, for the hot path at the top
            self._known[options_key] = (entry, step, in_steps, mean)
        if step and snapshot and not enable_graph:
            value = value.clone()  # the step value is read later (logging step, callbacks): keep this one
        self._record(entry, value, step, mean, batch_size, sync, sync_dist_group)

    def _record(self, entry: Entry, value: torch.Tensor, step: bool, mean: bool, batch_size: int | None, sync: bool,
                group: Any) -> None:
        """Update ``entry`` with a float scalar; epoch means are weighted by the batch size (given or inferred)."""
        if not mean:
            batch_size = 1
        elif batch_size is None:
            batch_size = self._batch_size
            if batch_size is None:
                batch_size = 1
                if self._batch is not None:
                    batch_size = self._batch_size = infer_batch_size(self._batch)
        entry.update(value, batch_size, self._step_sync(entry.reduce, group) if step and sync else None)

    def _step_sync(self, op: str, group: Any) -> Any:
        return lambda value: self._all_reduce(value.clone(), op, group)

    def _all_reduce(self, tensor: torch.Tensor, op: str, group: Any) -> torch.Tensor:
        if group is None:
            return self.reduce(tensor, op)
        import torch.distributed as dist

        dist_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                   "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(tensor, op=dist_op, group=group)
        return tensor / dist.get_world_size(group) if op == "mean" else tensor

    # ---- called by the loops -----------------------------------------------------------------------------
    def on_batch_start(self, batch: Any, dataloader_idx: int | None = None) -> None:
        """A batch begins: its size weights this batch's epoch means (inferred only if a mean needs it)."""
        self._batch, self._batch_size = batch, None
        self.dataloader_idx = dataloader_idx
        self._stepping = True

    def on_batch_end(self) -> None:
        """Drop the reference to the batch so that it can be freed."""
        self._batch = self._batch_size = None

    def epoch_end_reached(self) -> None:
        """The batches of this epoch are done: from here on callbacks see epoch values."""
        self._leave_steps()
        self._batch = self._batch_size = None

    def _leave_steps(self) -> None:
        if self._stepping:  # the last batch's step values stay visible, as after Lightning's on_batch_end
            self._fold(self._view(True))
            self._stepping = False

    @contextmanager
    def epoch_level(self) -> Iterator[None]:
        """Run epoch hooks in here when ``current_fx`` is not set: they get epoch-hook defaults and refusals."""
        self._leave_steps()
        self.epoch_hook = True
        try:
            yield
        finally:
            self.epoch_hook = False

    @property
    def dataloader_suffix(self) -> str:
        return "" if self.dataloader_idx is None else f"/dataloader_idx_{self.dataloader_idx}"

    @dataloader_suffix.setter
    def dataloader_suffix(self, suffix: str) -> None:
        self.dataloader_idx = int(suffix.rsplit("_", 1)[1]) if suffix else None

    def start_stage(self, stage: str) -> None:
        """Begin a stage's epoch. An evaluation inside a training epoch sets the training state aside."""
        if stage == _TRAIN:
            if self._saved is not None:  # a stage left without end_stage (an exception): drop it
                self.end_stage()
            self.stage = stage
            if not self._keep_restored:
                self._reset(self._entries)
            self._keep_restored = False
            self._stepping, self._batch, self._batch_size, self.dataloader_idx = False, None, None, None
            return
        if self._saved is None:
            if self._stepping:  # a validation inside a training epoch: the latest step values stay visible
                self._fold(self._view(True))
            self._saved = (self.stage, self._entries, self._stepping, self._batch, self._batch_size,
                           self.dataloader_idx)
        self.stage = stage
        self._entries = self._stages.setdefault(stage, {})
        self._reset(self._entries)
        self._stepping, self._batch, self._batch_size, self.dataloader_idx = False, None, None, None

    def end_stage(self) -> None:
        """End the stage's epoch: keep its values for callbacks, reset its accumulators and metrics."""
        self._leave_steps()
        self._fold(self._view(False))
        self._reset(self._entries)
        self._stepping = False
        if self.stage != _TRAIN and self._saved is not None:
            (self.stage, self._entries, self._stepping, self._batch, self._batch_size,
             self.dataloader_idx) = self._saved
            self._saved = None

    def reset_metrics(self) -> None:
        """A new trainer.fit/validate/test begins: forget every value (Lightning clears callback, progress-bar
        and logged metrics there). State restored by ``load_state_dict`` for this run is kept."""
        for stage, entries in self._stages.items():
            if not (stage == _TRAIN and self._keep_restored):
                self._reset(entries)
        if not self._keep_restored:
            self._callback.clear()
            self._pbar.clear()
        self._stepping, self._batch, self._batch_size = False, None, None

    def has_pending(self) -> bool:
        """Whether an epoch-level value was logged that ``reduce_epoch`` has not computed yet."""
        return any(e.on_epoch and not e.reported for e in self._valid())

    def reduce_epoch(self) -> dict[str, torch.Tensor]:
        """The epoch values (this dataloader's) updated since the last call: what loggers should get now.

        Collective when a value was logged with ``sync_dist``: call it on every rank.
        """
        self._leave_steps()
        out: dict[str, torch.Tensor] = {}
        for entry in self._valid():
            if entry.on_epoch and not entry.reported:
                value = entry.compute(self._reducer())
                entry.reported = True
                if value is not None and entry.logger:
                    out[entry.epoch_name] = value
        self._fold(self._view(False))
        return out

    @property
    def step_values(self) -> dict[str, torch.Tensor]:
        """The latest step values for loggers (``name`` or ``name_step``), as Lightning logs them per step."""
        if not self._stepping:
            return {}
        return {e.step_name: e.step for e in self._valid() if e.on_step and e.logger and e.step is not None}

    def callback_metrics(self) -> dict[str, torch.Tensor]:
        """Every key's newest value: step values while batches run, epoch values once they are done. The dict
        itself, as in Lightning: a value a callback sets there stays until a newer one is logged."""
        self._fold(self._view(self._stepping))
        return self._callback

    def progress_bar_metrics(self) -> dict[str, torch.Tensor]:
        """The ``prog_bar=True`` subset (tensors: converting them is the progress bar's, once per refresh)."""
        self._fold(self._view(self._stepping))
        return dict(self._pbar)

    # ---- views -------------------------------------------------------------------------------------------
    def _valid(self) -> Iterator[Entry]:
        dl = self.dataloader_idx
        return (e for e in self._entries.values() if not e.has_reset and e.dataloader_idx == dl)

    def _reducer(self) -> Any:
        return None if self.reduce is None else self._all_reduce

    def _view(self, on_step: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(callback, progress bar) values of the current entries, as Lightning's result collection gives them."""
        callback: dict[str, torch.Tensor] = {}
        pbar: dict[str, torch.Tensor] = {}
        training = self.stage == _TRAIN
        for e in self._valid():
            if on_step:
                if not e.on_step or e.step is None:
                    continue
                value, forked = e.step, e.step_name
            else:
                if not e.on_epoch:
                    continue
                value = e.compute(self._reducer())
                if value is None:
                    continue
                forked = e.epoch_name
            if training or not on_step:
                callback[e.log_name] = value
                callback[forked] = value
            if e.prog_bar:
                pbar[forked] = value
        return callback, pbar

    def _fold(self, view: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        self._callback.update(view[0])
        self._pbar.update(view[1])

    @staticmethod
    def _reset(entries: dict[tuple, Entry]) -> None:
        seen: set[int] = set()  # one Metric logged under several names is reset once
        for entry in entries.values():
            entry.reset(reset_metric=id(entry.metric) not in seen)
            seen.add(id(entry.metric))

    # ---- checkpointing (the fit loop's state) -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The training epoch's running state, bit-exact: accumulators, weights, step values, Metric states.

        Per rank (each rank holds its own partial sums). Only tensors, str, int, float, bool, None, lists
        and dicts: no pickle needed.
        """
        from framework.metrics.persist import collector_state

        return collector_state(self)

    def load_state_dict(self, state: dict[str, Any], module: torch.nn.Module | None = None,
                        resume_mid_epoch: bool = True) -> None:
        """Restore ``state_dict()``; logged torchmetrics.Metric objects are found on ``module`` by attribute.

        With ``resume_mid_epoch`` the next ``start_stage("train")`` continues the restored accumulators
        instead of starting the epoch from zero.
        """
        from framework.metrics.persist import restore_collector

        self._known.clear()  # the entries it points to are replaced
        restore_collector(self, state, module)
        self._keep_restored = resume_mid_epoch


def _default_float() -> torch.dtype:
    dtype = torch.get_default_dtype()
    return dtype if dtype in _FLOATS else torch.float32


def _to_float(name: str, fx: str, value: torch.Tensor) -> torch.Tensor:
    """Lightning reduces in float32 or wider; integers are converted with a one-time warning, as there."""
    if not value.is_floating_point():
        message = (f"self.log({name!r}, ...) in {fx}() got a {value.dtype} tensor; epoch values are reduced in "
                   f"floating point, so it is converted to {_default_float()}. Convert it yourself to silence this.")
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, stacklevel=4)
    return value.to(_default_float())

