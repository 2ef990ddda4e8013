"""MLFlowLogger: metrics, hyperparameters and (optionally) checkpoints in an MLflow tracking store.

Lightning's constructor arguments and meaning. mlflow is an optional extra (``pip install kiln[mlflow]``)
imported on first use. One difference: without ``tracking_uri`` (and no ``MLFLOW_TRACKING_URI``) the
store is ``sqlite:///<save_dir>/mlflow.db`` with artifacts in ``<save_dir>/artifacts`` — MLflow 3 refuses
the ``file:`` store Lightning defaults to unless ``MLFLOW_ALLOW_FILE_STORE=true``; pass
``tracking_uri="file:./mlruns"`` to get it.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any

from framework.loggers.base import (
    Logger,
    add_prefix,
    convert_params,
    flatten_params,
    is_rank_zero,
    is_url,
    to_float,
)

_STATUS = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_BAD_KEY_CHARS = re.compile(r"[^a-zA-Z0-9_/. -]+")


def _import_mlflow() -> Any:
    try:
        import mlflow.tracking
    except ImportError as err:
        raise ImportError("MLFlowLogger needs mlflow: pip install 'kiln[mlflow]' (or pip install mlflow).") from err
    return mlflow


class MLFlowLogger(Logger):
    """Logs to an MLflow run: ``experiment`` is the ``MlflowClient``, ``run_id``/``experiment_id`` name the run.

    ``log_model``: False (default) uploads no checkpoints; ``"all"`` uploads each checkpoint directory as
    ModelCheckpoint commits it; True uploads the final ones (best-k and last) when the run ends.
    ``prefix`` is put before metric names as ``prefix-name``; ``synchronous=False`` logs in the background.
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        save_dir: str | None = "./mlruns",
        log_model: bool | str = False,
        checkpoint_path_prefix: str = "",
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
    ) -> None:
        if log_model not in (False, True, "all"):
            raise ValueError(f"`log_model` must be False, True or 'all', got {log_model!r}.")
        if tags is not None and not isinstance(tags, Mapping):
            raise TypeError(f"`tags` must be a dict of tag names to values, got {tags!r}.")
        tracking_uri = tracking_uri or os.getenv("MLFLOW_TRACKING_URI")
        self._default_store = tracking_uri is None
        if tracking_uri is None:
            if not save_dir:
                raise ValueError("MLFlowLogger needs `tracking_uri` or `save_dir` (where the local store goes).")
            tracking_uri = f"sqlite:///{os.path.abspath(save_dir)}/mlflow.db"
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._tracking_uri = tracking_uri
        self._tags = dict(tags or {})
        self._save_dir = save_dir
        self._log_model = log_model
        self._checkpoint_path_prefix = checkpoint_path_prefix
        self._prefix = prefix
        self._artifact_location = artifact_location
        self._run_id = run_id
        self._experiment_id: str | None = None
        self._log_batch_kwargs = {} if synchronous is None else {"synchronous": synchronous}
        self._client: Any = None
        self._checkpoint_callback: Any = None
        self._logged_checkpoints: dict[str, float] = {}

    # ---- identity -----------------------------------------------------------------------------
    @property
    def experiment(self) -> Any:
        """The ``mlflow.tracking.MlflowClient``; creates the experiment and run on first use (rank 0 only)."""
        if self._client is None and is_rank_zero():
            self._client = self._connect()
        return self._client

    def _connect(self) -> Any:
        mlflow = _import_mlflow()
        if self._default_store:
            os.makedirs(self._save_dir, exist_ok=True)
        client = mlflow.tracking.MlflowClient(self._tracking_uri)
        if self._run_id is not None:
            self._experiment_id = client.get_run(self._run_id).info.experiment_id
            return client
        experiment = client.get_experiment_by_name(self._experiment_name)
        if experiment is not None:
            self._experiment_id = experiment.experiment_id
        else:
            location = self._artifact_location
            if location is None and self._default_store:
                location = os.path.abspath(os.path.join(self._save_dir, "artifacts"))
            self._experiment_id = client.create_experiment(self._experiment_name, artifact_location=location)
        run = client.create_run(self._experiment_id, tags={k: str(v) for k, v in self._tags.items()},
                                run_name=self._run_name)
        self._run_id = run.info.run_id
        return client

    @property
    def run_id(self) -> str | None:
        _ = self.experiment
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        _ = self.experiment
        return self._experiment_id

    @property
    def name(self) -> str | None:
        """The experiment id (as Lightning's MLFlowLogger)."""
        return self.experiment_id

    @property
    def version(self) -> str | None:
        """The run id (as Lightning's MLFlowLogger)."""
        return self.run_id

    @property
    def save_dir(self) -> str | None:
        """The local directory of a ``file:`` store, or of the default SQLite store; None otherwise."""
        if self._tracking_uri.startswith("file:"):
            return self._tracking_uri[len("file:"):]
        return self._save_dir if self._default_store else None

    # ---- logging ------------------------------------------------------------------------------
    def log_hyperparams(self, params: Any) -> None:
        if not is_rank_zero():
            return
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        flat = flatten_params(convert_params(params))
        entries = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flat.items()]
        for start in range(0, len(entries), 100):  # MLflow's per-request parameter limit
            self.experiment.log_batch(self.run_id, params=entries[start:start + 100], **self._log_batch_kwargs)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not is_rank_zero() or not metrics:
            return
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        entries = []
        for key, value in add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            clean = _BAD_KEY_CHARS.sub("", key)
            if clean != key:
                warnings.warn(f"MLflow metric names allow letters, digits and _/.- and space; logging {key!r} "
                              f"as {clean!r}.", UserWarning, stacklevel=2)
            entries.append(Metric(key=clean, value=to_float(key, value), timestamp=timestamp_ms, step=step or 0))
        self.experiment.log_batch(self.run_id, metrics=entries, **self._log_batch_kwargs)

    # ---- checkpoints and the end of a run ------------------------------------------------------
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if not is_rank_zero() or not self._log_model:
            return
        if self._log_model == "all" or getattr(checkpoint_callback, "save_top_k", None) == -1:
            self._log_checkpoints(checkpoint_callback)
        else:
            self._checkpoint_callback = checkpoint_callback

    def _log_checkpoints(self, checkpoint_callback: Any) -> None:
        paths = list(getattr(checkpoint_callback, "best_k_models", {}) or {})
        paths += [getattr(checkpoint_callback, name, "") for name in ("best_model_path", "last_model_path")]
        for path in dict.fromkeys(p for p in paths if p):
            stamp = _modified_time(path)
            if self._logged_checkpoints.get(path) == stamp:
                continue
            artifact_path = f"{self._checkpoint_path_prefix}{os.path.basename(path.rstrip('/'))}"
            with _local_copy(path) as local:
                if os.path.isdir(local):
                    self.experiment.log_artifacts(self.run_id, local, artifact_path=artifact_path)
                else:
                    self.experiment.log_artifact(self.run_id, local, artifact_path=self._checkpoint_path_prefix or None)
            self._logged_checkpoints[path] = stamp

    def finalize(self, status: str) -> None:
        if not is_rank_zero() or self._client is None:
            return
        if self._checkpoint_callback is not None:
            self._log_checkpoints(self._checkpoint_callback)
        self._client.set_terminated(self._run_id, _STATUS.get(status, status.upper()))


def _modified_time(path: str) -> float:
    if is_url(path):
        return -1.0  # remote: uploaded once per path
    try:
        return os.path.getmtime(path)
    except OSError:
        return -1.0


class _local_copy:
    """A local path for ``path``: itself when local, a downloaded temporary copy of a URL."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> str:
        if not is_url(self.path):
            return self.path
        from framework.loggers.base import url_to_fs

        fs, remote = url_to_fs(self.path)
        self._tmp = tempfile.TemporaryDirectory(prefix="kiln-mlflow-")
        local = os.path.join(self._tmp.name, os.path.basename(remote.rstrip("/")))
        fs.get(remote, local, recursive=True)
        return local

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
