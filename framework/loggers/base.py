"""The Logger base and what the file loggers share: rank-zero gating, prefixes, hyperparameter
flattening, ``save_dir/name/version_N`` resolution and staging of remote (fsspec URL) log dirs.

The Trainer hands loggers plain floats at logging steps only, so loggers never cause per-step host
syncs. Only global rank 0 writes; on other ranks every method is a no-op. A ``save_dir`` such as
``memory://`` or ``s3://`` is written to a local temporary directory and uploaded on
``save()``/``finalize()`` because most object stores cannot append to a file.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from framework.checkpoint.storage import join_path
from framework.state import DistributedState

_VERSION_DIR = re.compile(r"^version_(\d+)$")
HPARAMS_FILE = "hparams.yaml"


def is_rank_zero() -> bool:
    return DistributedState().process_index == 0


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def to_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"Logger got metric `{name}` = {value!r}, which is not a number. Log numbers or "
            "one-element tensors."
        ) from err


def add_prefix(metrics: Mapping[str, Any], prefix: str, separator: str) -> dict[str, Any]:
    """``{prefix}{separator}{key}`` for every key (Lightning's logger ``prefix`` argument); as is without a prefix."""
    if not prefix:
        return dict(metrics)
    return {f"{prefix}{separator}{key}": value for key, value in metrics.items()}


def convert_params(params: Any) -> dict[str, Any]:
    """Hyperparameters as a dict: a Mapping, an ``argparse.Namespace``, or None (empty)."""
    if params is None:
        return {}
    if isinstance(params, argparse.Namespace):
        return vars(params).copy()
    if isinstance(params, Mapping):
        return dict(params)
    raise TypeError(
        f"log_hyperparams got {type(params).__name__}; pass a dict (e.g. module.hparams) or an "
        "argparse.Namespace."
    )


def flatten_params(params: Mapping[str, Any], separator: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and Namespaces) flattened to ``outer/inner`` keys."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, argparse.Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, separator, f"{name}{separator}"))
        else:
            flat[name] = value
    return flat


def write_hparams_yaml(path: str, params: Mapping[str, Any]) -> None:
    """Write ``params`` to ``hparams.yaml``; a value YAML cannot represent is skipped with a warning."""
    import yaml

    safe: dict[str, Any] = {}
    for key, value in params.items():
        value = _plain(value)
        try:
            yaml.safe_dump({key: value})
        except yaml.YAMLError:
            warnings.warn(
                f"hparams.yaml: skipping hyperparameter {key!r} = {value!r}; YAML cannot represent a "
                f"{type(value).__name__}. Store plain numbers, strings, lists or dicts.",
                UserWarning,
                stacklevel=3,
            )
            continue
        safe[key] = value
    with open(path, "w") as f:
        yaml.safe_dump(safe, f, sort_keys=False)


def _plain(value: Any) -> Any:
    """Containers YAML's safe dumper does not know (tuples, Namespaces, paths) as lists/dicts/strings."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # one-element tensor
        return value.item()
    return value


class Logger:
    """Base class for experiment loggers (Lightning's ``Logger`` interface).

    Subclasses write ``log_metrics`` rows somewhere durable. Every method here is a harmless no-op so
    a custom logger overrides only what it needs.
    """

    group_separator = "/"

    @property
    def name(self) -> str | None:
        return ""

    @property
    def version(self) -> int | str | None:
        return 0

    @property
    def root_dir(self) -> str | None:
        return None

    @property
    def log_dir(self) -> str | None:
        return None

    @property
    def save_dir(self) -> str | None:
        return None

    @property
    def experiment(self) -> Any:
        """The backend object (e.g. a SummaryWriter); None for loggers without one."""
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record ``metrics`` (name → number) at ``step``."""

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Record the run's hyperparameters (a dict or ``argparse.Namespace``)."""

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Record the model's computational graph (TensorBoard only)."""

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Called by ModelCheckpoint after each committed checkpoint (MLflow uploads it with ``log_model``)."""

    def save(self) -> None:
        """Make everything logged so far durable (flush, upload)."""

    def finalize(self, status: str) -> None:
        """Called once a run ends with ``status`` ("success", "failed", "interrupted")."""
        self.save()


class VersionedDirLogger(Logger):
    """Shared by the file loggers: ``save_dir/name/version_N[/sub_dir]`` resolution and remote staging."""

    def __init__(
        self, save_dir: str | os.PathLike, name: str | None, version: int | str | None, sub_dir: str | None = None
    ) -> None:
        if not isinstance(save_dir, (str, os.PathLike)):
            raise TypeError(
                f"`save_dir` must be a local path or fsspec URL string, got {save_dir!r}. "
                "Pass e.g. 'runs' or 'memory://runs'."
            )
        if version is not None and (isinstance(version, bool) or not isinstance(version, (int, str))):
            raise TypeError(f"`version` must be an int, a str or None, got {version!r}.")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"`name` must be a str or None, got {name!r}.")
        if sub_dir is not None and not isinstance(sub_dir, (str, os.PathLike)):
            raise TypeError(f"`sub_dir` must be a str or None, got {sub_dir!r}.")
        self._save_dir = os.path.expanduser(os.path.expandvars(os.fspath(save_dir)))
        self._name = name or ""
        self._version = version
        self._sub_dir = None if sub_dir is None else os.path.expanduser(os.path.expandvars(os.fspath(sub_dir)))
        self._staging: str | None = None  # local dir that files are written to

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def name(self) -> str:
        return self._name

    @property
    def sub_dir(self) -> str | None:
        return self._sub_dir

    @property
    def root_dir(self) -> str:
        """``save_dir/name``: the parent of every version directory (``save_dir`` when name is empty)."""
        return join_path(self._save_dir, self._name)

    @property
    def version(self) -> int | str:
        """The given version, or one more than the largest existing ``version_N`` (resolved once)."""
        if self._version is None:
            self._version = self._next_version()
            if is_rank_zero():  # claim it now so a second logger in this process picks the next one
                self._makedirs(self.log_dir)
        return self._version

    @property
    def log_dir(self) -> str:
        version = self.version
        return join_path(self.root_dir, version if isinstance(version, str) else f"version_{version}", self._sub_dir or "")

    def _next_version(self) -> int:
        root = self.root_dir
        try:
            if is_url(root):
                fs, path = url_to_fs(root)
                fs.invalidate_cache()
                names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
            else:
                names = os.listdir(root)
        except FileNotFoundError:
            return 0
        versions = [int(m.group(1)) for m in map(_VERSION_DIR.match, names) if m]
        return max(versions) + 1 if versions else 0

    def _makedirs(self, path: str) -> None:
        if is_url(path):
            fs, fs_path = url_to_fs(path)
            fs.makedirs(fs_path, exist_ok=True)
        else:
            os.makedirs(path, exist_ok=True)

    def _local_dir(self) -> str:
        """Where files are written: the log dir itself, or a staging copy of a remote one."""
        if self._staging is None:
            target = self.log_dir
            if is_url(target):
                staging = tempfile.mkdtemp(prefix="kiln-logs-")
                weakref.finalize(self, shutil.rmtree, staging, True)
                download_tree(target, staging)  # continue an existing remote version, as locally
                self._staging = staging
            else:
                os.makedirs(target, exist_ok=True)
                self._staging = target
        return self._staging

    def _upload(self) -> None:
        if self._staging is None or not is_url(self.log_dir):
            return
        fs, remote_root = url_to_fs(self.log_dir)
        for dirpath, _, filenames in os.walk(self._staging):
            for filename in filenames:
                local = os.path.join(dirpath, filename)
                rel = os.path.relpath(local, self._staging).replace(os.sep, "/")
                fs.put_file(local, f"{remote_root.rstrip('/')}/{rel}")


def url_to_fs(url: str):
    from framework.checkpoint.storage import url_to_fs as _url_to_fs  # credentials in the URL become options

    return _url_to_fs(url)


def download_tree(url: str, local_dir: str) -> None:
    fs, root = url_to_fs(url)
    if not fs.exists(root):
        return
    root = root.rstrip("/")
    for remote in fs.find(root):
        local = os.path.join(local_dir, *remote[len(root) + 1 :].split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(remote, local)
