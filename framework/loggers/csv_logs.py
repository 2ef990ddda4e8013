"""CSVLogger: ``metrics.csv`` and ``hparams.yaml`` under ``save_dir/name/version_N``, as Lightning's.

``experiment`` is the ``ExperimentWriter`` that owns the files, so code that reads
``logger.experiment.metrics`` or ``metrics_file_path`` after porting keeps working.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from typing import Any

from framework.loggers.base import (
    HPARAMS_FILE,
    VersionedDirLogger,
    add_prefix,
    convert_params,
    is_rank_zero,
    to_float,
    write_hparams_yaml,
)


class ExperimentWriter:
    """Buffers metric rows and writes them to ``metrics.csv`` in ``log_dir`` on ``save()``.

    Columns are ``step`` and every metric name seen so far (sorted); a new name rewrites the file with
    the wider header, keeping earlier rows. An existing file (a resumed version) is continued.
    """

    NAME_METRICS_FILE = "metrics.csv"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self.metrics: list[dict[str, Any]] = []  # rows not yet written
        self.hparams: dict[str, Any] = {}
        self._keys: set[str] = set()
        self._file_header: list[str] | None = None  # header of metrics.csv on disk, once read

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        row = {key: to_float(key, value) for key, value in metrics.items()}
        row["step"] = int(step) if step is not None else len(self.metrics)
        self._keys.update(row)
        self.metrics.append(row)

    def log_hparams(self, params: Mapping[str, Any]) -> None:
        self.hparams.update(params)
        write_hparams_yaml(os.path.join(self.log_dir, HPARAMS_FILE), self.hparams)

    def save(self) -> None:
        if not self.metrics:
            return
        path = self.metrics_file_path
        if self._file_header is None:
            self._file_header = _read_header(path)
        header = ["step", *sorted((self._keys | set(self._file_header)) - {"step"})]
        if header == self._file_header:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writerows(self.metrics)
        else:
            old_rows = _read_rows(path)
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(old_rows)
                writer.writerows(self.metrics)
            self._file_header = header
        self.metrics.clear()


class CSVLogger(VersionedDirLogger):
    """Lightning's CSVLogger: one ``metrics.csv`` row per ``log_metrics`` call.

    Rows are buffered and written every ``flush_logs_every_n_steps`` logged rows and on ``save()``
    (the Trainer saves at every epoch end). ``prefix`` is put before metric names as ``prefix-name``.
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(save_dir, name, version)
        if isinstance(flush_logs_every_n_steps, bool) or not isinstance(flush_logs_every_n_steps, int) \
                or flush_logs_every_n_steps < 1:
            raise ValueError(
                f"`flush_logs_every_n_steps` must be a positive int, got {flush_logs_every_n_steps!r}."
            )
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a str, got {prefix!r}.")
        self._prefix = prefix
        self._flush_logs_every_n_steps = flush_logs_every_n_steps
        self._experiment: ExperimentWriter | None = None

    @property
    def flush_logs_every_n_steps(self) -> int:
        return self._flush_logs_every_n_steps

    @property
    def experiment(self) -> ExperimentWriter | None:
        """The ``ExperimentWriter`` of this version (None on ranks other than 0)."""
        if self._experiment is None and is_rank_zero():
            self._experiment = ExperimentWriter(self._local_dir())
        return self._experiment

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not is_rank_zero():
            return
        writer = self.experiment
        writer.log_metrics(add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR), step)
        if len(writer.metrics) >= self._flush_logs_every_n_steps:
            writer.save()

    def log_hyperparams(self, params: Any) -> None:
        """Write ``hparams.yaml`` (merged with earlier calls)."""
        if is_rank_zero():
            self.experiment.log_hparams(convert_params(params))

    def save(self) -> None:
        if is_rank_zero() and self._experiment is not None:
            self._experiment.save()
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
