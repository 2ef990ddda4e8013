"""Checkpoint names and paths for ModelCheckpoint: Lightning's filename templates, checked up front.

Every Kiln checkpoint is a directory directly under ``dirpath``, committed by its manifest. Its name
is what Lightning would call the file, extension included (``epoch=2-step=30.ckpt``), so a path a
user sees in ``best_model_path`` reads as in Lightning and is accepted by ``trainer.fit(ckpt_path=...)``
and ``TrainModule.load_from_checkpoint``. Names that would leave ``dirpath`` or look like Kiln's hidden
staging folders are refused when the callback is built, not after the first epoch.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from framework.trainer import Trainer

_FIELD = re.compile(r"(\{.*?)[:}]")


def format_template(template: str, metrics: dict[str, Any], *, auto_insert_metric_name: bool,
                    equals: str = "=") -> str:
    """Fill ``template``'s ``{name[:spec]}`` fields from ``metrics``; unknown names format as 0 (as Lightning).

    With ``auto_insert_metric_name`` each field ``{name...}`` becomes ``name=<value>``. Field names may
    contain dots and slashes (``{val/loss:.2f}``).
    """
    values = dict(metrics)
    fields = sorted(set(_FIELD.findall(template)), key=len, reverse=True)  # "epoch_x" before "epoch"
    for group in fields:
        name = group[1:]
        if auto_insert_metric_name:
            template = template.replace(group, f"{name}{equals}{{{name}")
        template = template.replace(group, f"{{0[{name}]")
        values.setdefault(name, torch.tensor(0))
    return template.format(values)


def check_name(name: str, *, what: str) -> None:
    """Refuse a checkpoint name that is not one plain, visible directory name inside ``dirpath``."""
    if not name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"{what} gives the checkpoint name {name!r}, which is empty, '.'/'..' or hidden (starts "
                         "with '.', like Kiln's staging folders); choose a name such as '{epoch}-{step}'.")
    bad = [c for c in ("/", "\\", "\0") if c in name]
    if bad:
        raise ValueError(f"{what} gives the checkpoint name {name!r}, which contains {bad[0]!r}: every Kiln checkpoint "
                         "is one directory directly under dirpath. Put folders in dirpath; for metric names with '/' "
                         "pass auto_insert_metric_name=False and write the name yourself, e.g. 'val_loss={val/loss:.2f}'.")


def check_filename(filename: str | None, *, auto_insert_metric_name: bool, join: str = "-",
                   equals: str = "=", extension: str = ".ckpt") -> None:
    """Validate a ``filename`` template at construction by formatting it with sample values."""
    if filename is None:
        return
    if not isinstance(filename, str):
        raise TypeError(f"ModelCheckpoint(filename={filename!r}) must be a str template such as '{{epoch}}-{{val_loss:.2f}}'.")
    what = f"ModelCheckpoint(filename={filename!r})"
    try:
        sample = format_template(filename, {"epoch": torch.tensor(0), "step": torch.tensor(0)},
                                 auto_insert_metric_name=auto_insert_metric_name, equals=equals)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"{what} is not a valid template ({exc}); use fields like '{{epoch}}', '{{step:05d}}' or "
                         "'{val_loss:.2f}'.") from None
    check_name(sample + extension, what=what)
    for version in ("", f"{join}v1"):
        check_name(sample + version + extension, what=what)


def check_dirpath(dirpath: Any) -> str | None:
    """Normalise ``dirpath`` (``~`` and symlinks resolved for local paths, as Lightning) and refuse bad ones."""
    if dirpath is None:
        return None
    if not isinstance(dirpath, (str, os.PathLike)):
        raise TypeError(f"ModelCheckpoint(dirpath={dirpath!r}) must be a path or fsspec URL string.")
    path = os.fspath(dirpath)
    if not isinstance(path, str) or not path.strip() or "\0" in path:
        raise ValueError(f"ModelCheckpoint(dirpath={dirpath!r}) must be a non-empty folder path or URL.")
    if "://" in path and not path.startswith("file://"):
        return path
    path = os.path.realpath(os.path.expanduser(path[len("file://"):] if path.startswith("file://") else path))
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        where = "is" if probe == path else f"is inside {probe!r}, which is"
        raise ValueError(f"ModelCheckpoint(dirpath={dirpath!r}) {where} a file, not a folder; pass a folder for "
                         "the checkpoint directories.")
    if os.path.isdir(probe) and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"ModelCheckpoint(dirpath={dirpath!r}) cannot be created or written: {probe!r} is not "
                         "writable. Pass a folder you can write to.")
    return path


def join(base: str, name: str) -> str:
    from framework.checkpoint.storage import join_path

    return join_path(base, name)


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def link_last(target: str, link: str) -> None:
    """Point ``link`` at ``target`` atomically (a reader sees the old or the new entry, never a partial one).

    A relative symlink, so the folder can move as a whole (ModelCheckpoint only links siblings in dirpath).
    Where symlinks are not allowed (Windows without the privilege) it falls back to a copy, as Lightning does,
    made under a hidden name and renamed into place.
    """
    import shutil

    folder, name = os.path.dirname(link) or ".", os.path.basename(link)
    tmp = os.path.join(folder, f".{name}.tmp-link")
    _remove_entry(tmp)
    try:
        os.symlink(os.path.relpath(target, folder), tmp)
    except OSError:
        if os.path.isdir(target):
            shutil.copytree(target, tmp, symlinks=True)
        else:
            shutil.copy2(target, tmp)
    if os.path.isdir(link) and not os.path.islink(link):  # os.replace cannot replace a directory
        _remove_entry(link)
    os.replace(tmp, link)


def _remove_entry(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        from framework.checkpoint import remove_checkpoint

        remove_checkpoint(path, force=True)  # hidden first, then deleted: never half a checkpoint visible


def resolve_best(trainer: Trainer, fn: str = "fit") -> str:
    """The path ``ckpt_path="best"`` means for ``trainer.<fn>()``: the first ModelCheckpoint's best_model_path.

    Raises ``ValueError`` (Lightning's messages) when there is no ModelCheckpoint or it holds no best path.
    """
    from callbacks.checkpoint import ModelCheckpoint

    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    if len(callbacks) > 1:
        warnings.warn(f'`.{fn}(ckpt_path="best")` is called with Trainer configured with multiple `ModelCheckpoint` '
                      "callbacks. It will use the best checkpoint path from first checkpoint callback.", stacklevel=2)
    if not callbacks:
        raise ValueError(f'`.{fn}(ckpt_path="best")` is set but `ModelCheckpoint` is not configured. Add a '
                         "ModelCheckpoint to callbacks (or enable_checkpointing=True), or pass a checkpoint path.")
    best = callbacks[0].best_model_path
    if not best:
        if getattr(trainer, "fast_dev_run", False):
            raise ValueError(f'You cannot execute `.{fn}(ckpt_path="best")` with `fast_dev_run=True`. Please pass an '
                             f"exact checkpoint path to `.{fn}(ckpt_path=...)`")
        raise ValueError(f'`.{fn}(ckpt_path="best")` is set but `ModelCheckpoint` is not configured to save the best '
                         "model (it has saved none yet). Fit first, or pass a checkpoint path.")
    return best
