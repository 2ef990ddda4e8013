"""Experiment loggers: TensorBoard event files and CSV, on local paths or fsspec URLs.

The Trainer hands each logger plain floats at logging steps only, so loggers never cause per-step
host syncs. Only the global rank 0 process writes; on other ranks every method is a no-op. A
``save_dir`` like ``memory://`` or ``s3://`` is staged in a local temporary directory and uploaded on
``save()``/``finalize()`` because most object stores cannot append to a file.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Mapping
from typing import Any

from framework.state import DistributedState

_VERSION_DIR = re.compile(r"^version_(\d+)$")
_EVENT_FILE_COUNTER = itertools.count()


def _is_rank_zero() -> bool:
    return DistributedState().process_index == 0


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _join(base: str, *parts: str) -> str:
    parts = tuple(p for p in parts if p)
    if _is_url(base):
        return "/".join((base.rstrip("/"), *parts))
    return os.path.join(base, *parts)


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"Logger got metric `{name}` = {value!r}, which is not a number. Log numbers or "
            "one-element tensors."
        ) from err


class Logger:
    """Base class for experiment loggers. Subclasses write ``log_metrics`` rows somewhere durable."""

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> int | str:
        return 0

    @property
    def log_dir(self) -> str | None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record ``metrics`` (name → number) at ``step``."""

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters."""

    def save(self) -> None:
        """Make everything logged so far durable (flush, upload)."""

    def finalize(self, status: str) -> None:
        """Called once a run ends with ``status`` ("success", "failed", "interrupted")."""
        self.save()


class _VersionedDirLogger(Logger):
    """Shared by the file loggers: ``save_dir/name/version_N`` resolution and remote staging."""

    def __init__(self, save_dir: str | os.PathLike, name: str | None, version: int | str | None) -> None:
        if not isinstance(save_dir, (str, os.PathLike)):
            raise TypeError(
                f"`save_dir` must be a local path or fsspec URL string, got {save_dir!r}. "
                "Pass e.g. 'runs' or 'memory://runs'."
            )
        if version is not None and not isinstance(version, (int, str)):
            raise TypeError(f"`version` must be an int, a str or None, got {version!r}.")
        self._save_dir = os.fspath(save_dir)
        self._name = name or ""
        self._version = version
        self._staging: str | None = None  # local dir that files are written to

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def name(self) -> str:
        return self._name

    @property
    def root_dir(self) -> str:
        """``save_dir/name``: the parent of every version directory."""
        return _join(self._save_dir, self._name)

    @property
    def version(self) -> int | str:
        """The given version, or one more than the largest existing ``version_N`` (resolved once)."""
        if self._version is None:
            self._version = self._next_version()
            if _is_rank_zero():  # claim it now so a second logger in this process picks the next one
                self._makedirs(self.log_dir)
        return self._version

    @property
    def log_dir(self) -> str:
        version = self.version
        return _join(self.root_dir, version if isinstance(version, str) else f"version_{version}")

    def _next_version(self) -> int:
        root = self.root_dir
        try:
            if _is_url(root):
                fs, path = _url_to_fs(root)
                fs.invalidate_cache()
                names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
            else:
                names = os.listdir(root)
        except FileNotFoundError:
            return 0
        versions = [int(m.group(1)) for m in map(_VERSION_DIR.match, names) if m]
        return max(versions) + 1 if versions else 0

    def _makedirs(self, path: str) -> None:
        if _is_url(path):
            fs, fs_path = _url_to_fs(path)
            fs.makedirs(fs_path, exist_ok=True)
        else:
            os.makedirs(path, exist_ok=True)

    def _local_dir(self) -> str:
        """Where files are written: the log dir itself, or a staging copy of a remote one."""
        if self._staging is None:
            target = self.log_dir
            if _is_url(target):
                staging = tempfile.mkdtemp(prefix="kiln-logs-")
                weakref.finalize(self, shutil.rmtree, staging, True)
                _download_tree(target, staging)  # continue an existing remote version, as locally
                self._staging = staging
            else:
                os.makedirs(target, exist_ok=True)
                self._staging = target
        return self._staging

    def _upload(self) -> None:
        if self._staging is None or not _is_url(self.log_dir):
            return
        fs, remote_root = _url_to_fs(self.log_dir)
        for dirpath, _, filenames in os.walk(self._staging):
            for filename in filenames:
                local = os.path.join(dirpath, filename)
                rel = os.path.relpath(local, self._staging).replace(os.sep, "/")
                fs.put_file(local, f"{remote_root.rstrip('/')}/{rel}")

    def _write_hparams_json(self, params: Mapping[str, Any]) -> None:
        path = os.path.join(self._local_dir(), "hparams.json")
        with open(path, "w") as f:
            json.dump(dict(params), f, indent=2, sort_keys=True, default=repr)


def _url_to_fs(url: str):
    from framework.checkpoint_storage import url_to_fs  # credentials in the URL become storage options

    return url_to_fs(url)


def _download_tree(url: str, local_dir: str) -> None:
    fs, root = _url_to_fs(url)
    if not fs.exists(root):
        return
    root = root.rstrip("/")
    for remote in fs.find(root):
        local = os.path.join(local_dir, *remote[len(root) + 1 :].split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(remote, local)


class TensorBoardLogger(_VersionedDirLogger):
    """Writes scalars to a TensorBoard event file under ``save_dir/name/version_N``.

    ``flush_secs`` bounds how stale the local event file may get between ``save()`` calls. tensorboard
    is imported on the first write, not when this module is imported.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str | None = "logs",
        version: int | str | None = None,
        flush_secs: float = 10.0,
    ) -> None:
        super().__init__(save_dir, name, version)
        self.flush_secs = flush_secs
        self._file: Any = None
        self._records: Any = None  # tensorboard RecordWriter over self._file
        self._last_flush = 0.0
        self._event_pb2: Any = None
        self._summary_pb2: Any = None

    def _writer(self):
        if self._records is None:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter

            self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
            host, pid, n = socket.gethostname(), os.getpid(), next(_EVENT_FILE_COUNTER)
            filename = f"events.out.tfevents.{time.time():.0f}.{host}.{pid}.{n}"
            self._file = open(os.path.join(self._local_dir(), filename), "ab")
            self._records = RecordWriter(self._file)
            self._write_event(file_version="brain.Event:2")
            self._last_flush = time.monotonic()
        return self._records

    def _write_event(self, **fields: Any) -> None:
        event = self._event_pb2.Event(wall_time=time.time(), **fields)
        self._records.write(event.SerializeToString())

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not _is_rank_zero() or not metrics:
            return
        self._writer()
        values = [
            self._summary_pb2.Summary.Value(tag=key, simple_value=_to_float(key, value))
            for key, value in metrics.items()
        ]
        self._write_event(step=int(step), summary=self._summary_pb2.Summary(value=values))
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self._file.flush()
            self._last_flush = time.monotonic()

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Writes ``hparams.json`` and the TensorBoard HPARAMS-tab record for ``params``."""
        if not _is_rank_zero():
            return
        params = dict(params)
        self._write_hparams_json(params)
        flat = {
            k: v if isinstance(v, (bool, int, float, str)) else repr(v) for k, v in _flatten(params).items()
        }
        if not flat:
            return
        from tensorboard.plugins.hparams import summary_v2

        self._writer()
        self._write_event(summary=summary_v2.hparams_pb(flat))

    def save(self) -> None:
        if not _is_rank_zero():
            return
        if self._file is not None:
            self._file.flush()
            self._last_flush = time.monotonic()
        self._upload()

    def finalize(self, status: str) -> None:
        if not _is_rank_zero():
            return
        if self._file is not None:
            self._file.close()
            self._file = self._records = None  # a later write opens a new event file
        self._upload()


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


class CSVLogger(_VersionedDirLogger):
    """Writes one ``metrics.csv`` row per ``log_metrics`` call under ``save_dir/name/version_N``.

    Columns are ``step`` and every metric name seen so far (sorted); a new name rewrites the file
    with the wider header. Rows are buffered and written every ``flush_logs_every_n_steps`` calls and
    on ``save()``. Hyperparameters go to ``hparams.json``.
    """

    METRICS_FILE = "metrics.csv"

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str | None = "logs",
        version: int | str | None = None,
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(save_dir, name, version)
        if not isinstance(flush_logs_every_n_steps, int) or flush_logs_every_n_steps < 1:
            raise ValueError(
                f"`flush_logs_every_n_steps` must be a positive int, got {flush_logs_every_n_steps!r}."
            )
        self.flush_logs_every_n_steps = flush_logs_every_n_steps
        self._rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._file_header: list[str] | None = None  # header of metrics.csv on disk, once read

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not _is_rank_zero():
            return
        row = {key: _to_float(key, value) for key, value in metrics.items()}
        row["step"] = int(step)
        self._keys.update(row)
        self._rows.append(row)
        if len(self._rows) >= self.flush_logs_every_n_steps:
            self._flush()

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        if _is_rank_zero():
            self._write_hparams_json(params)

    def _flush(self) -> None:
        if not self._rows:
            return
        path = os.path.join(self._local_dir(), self.METRICS_FILE)
        if self._file_header is None:
            self._file_header = _read_header(path)
        header = ["step", *sorted((self._keys | set(self._file_header)) - {"step"})]
        if header == self._file_header:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writerows(self._rows)
        else:
            old_rows = _read_rows(path)
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(old_rows)
                writer.writerows(self._rows)
            self._file_header = header
        self._rows.clear()

    def save(self) -> None:
        if _is_rank_zero():
            self._flush()
            self._upload()

    def finalize(self, status: str) -> None:
        self.save()


def _read_header(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _read_rows(path: str) -> list[dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def resolve_loggers(logger: Any, default_root_dir: str | os.PathLike | None) -> list[Logger]:
    """Turn the Trainer's ``logger=`` argument into a list of loggers.

    True → a TensorBoardLogger under ``default_root_dir`` (the working directory when None);
    False/None → no logging; a Logger → ``[logger]``; a list/tuple of Loggers → that list.
    """
    if logger is True:
        return [TensorBoardLogger(default_root_dir if default_root_dir is not None else os.getcwd())]
    if logger is False or logger is None:
        return []
    if isinstance(logger, Logger):
        return [logger]
    if isinstance(logger, (list, tuple)):
        for item in logger:
            if not isinstance(item, Logger):
                raise TypeError(
                    f"`logger` list holds {item!r}, which is not a framework.loggers.Logger. Pass "
                    "Logger instances such as TensorBoardLogger(...) or CSVLogger(...)."
                )
        return list(logger)
    raise TypeError(
        f"`logger` must be True, False, None, a Logger or a list of Loggers, got {logger!r}. "
        "Pass e.g. logger=CSVLogger('runs') or logger=False to disable logging."
    )
