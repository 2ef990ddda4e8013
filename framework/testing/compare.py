"""Bit-identity assertions for tests: two modules, two state trees or two Kiln checkpoints are the same.

A failure names every differing entry by its path (``trainer.optimizers.0.state.0.exp_avg``) with the
maximum absolute difference, where it occurs and how many elements differ, so a failing resume or
equivalence test says *what* diverged. Tensors are compared bit for bit (``0.0`` and ``-0.0`` differ,
NaNs with the same bits are equal); ``atol``/``rtol`` switch to ``torch.isclose`` (NaNs equal) for tests
whose results legitimately differ by rounding, e.g. accumulation against one big batch.
Re-exported by :mod:`framework.testing`.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["assert_modules_equal", "assert_state_equal", "assert_checkpoints_equal", "state_differences"]

#: Checkpoint entries ignored by default: ModelCheckpoint's state names the checkpoint folder, which
#: differs between two runs under different roots even when their training is identical.
DEFAULT_CHECKPOINT_IGNORE = ("trainer.callbacks.ModelCheckpoint*",)
_MAX_LISTED = 20


def assert_modules_equal(a: torch.nn.Module, b: torch.nn.Module, *, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Assert two modules hold identical parameters and buffers (same names, dtypes, shapes and bits).

    Wrappers are looked through (``.module`` of DDP/DeepSpeed engines); with ``atol``/``rtol`` the values
    need only be close. Sharded (DTensor) entries are gathered, which is collective: call it on every rank.
    """
    _check_tolerances(atol, rtol)
    for name, module in (("a", a), ("b", b)):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"assert_modules_equal: {name}={type(module).__name__} is not a torch.nn.Module; "
                            "pass modules, or use assert_state_equal for state dicts.")
    _raise_if_different(state_differences(_unwrap(a).state_dict(), _unwrap(b).state_dict(), atol=atol, rtol=rtol),
                        "The modules differ")


def assert_state_equal(a: Any, b: Any, *, atol: float = 0.0, rtol: float = 0.0,
                       ignore: Iterable[str] = ()) -> None:
    """Assert two state trees (nested dicts/lists of tensors, arrays and plain values) are identical.

    ``ignore`` holds ``fnmatch`` patterns of dotted paths to skip, e.g. ``"optimizers.*.param_groups"``.
    """
    _check_tolerances(atol, rtol)
    _raise_if_different(state_differences(a, b, atol=atol, rtol=rtol, ignore=ignore), "The states differ")


def assert_checkpoints_equal(a: str | os.PathLike, b: str | os.PathLike, *, atol: float = 0.0, rtol: float = 0.0,
                             ignore: Iterable[str] = DEFAULT_CHECKPOINT_IGNORE) -> None:
    """Assert two Kiln checkpoints (paths or URLs) hold identical training state.

    Compares the model weights (consolidated, so a sharded checkpoint equals a full one) and every
    named state: ``trainer`` (optimizers, schedulers, loop position, precision, callbacks) and each
    ``rank-N`` (RNG, data position). Paths are dotted, prefixed by the state name (``model.layer.weight``,
    ``trainer.loop.global_step``, ``rank-0.callbacks.RNGCapture.torch``). By default ModelCheckpoint's
    bookkeeping is ignored (see ``DEFAULT_CHECKPOINT_IGNORE``); pass ``ignore=()`` to compare it too.
    Sharded optimizer files (``dcp/``, DeepSpeed engine files) are not compared.
    """
    from framework.checkpoint import MODEL, read_manifest, read_state
    from framework.checkpoint.consolidate import read_model_state

    _check_tolerances(atol, rtol)
    a, b = os.fspath(a), os.fspath(b)
    manifests = read_manifest(a), read_manifest(b)
    names = [set(m.state_names()) - {MODEL} for m in manifests]
    problems = []
    if names[0] != names[1]:
        problems.append(f"states: only in a {sorted(names[0] - names[1])}, only in b {sorted(names[1] - names[0])}")
    problems += state_differences(read_model_state(a, manifests[0]), read_model_state(b, manifests[1]),
                                  atol=atol, rtol=rtol, ignore=ignore, prefix=MODEL)
    for name in sorted(names[0] & names[1]):
        problems += state_differences(read_state(a, name, manifests[0]), read_state(b, name, manifests[1]),
                                      atol=atol, rtol=rtol, ignore=ignore, prefix=name)
    _raise_if_different(problems, f"The checkpoints {a} and {b} differ")


def state_differences(a: Any, b: Any, *, atol: float = 0.0, rtol: float = 0.0, ignore: Iterable[str] = (),
                      prefix: str = "") -> list[str]:
    """One line per difference between two state trees (empty when they are identical)."""
    out: list[str] = []
    _compare(a, b, prefix, out, atol, rtol, tuple(ignore))
    return out


# ---- the comparison -------------------------------------------------------------------------------
def _compare(a: Any, b: Any, path: str, out: list[str], atol: float, rtol: float, ignore: tuple[str, ...]) -> None:
    if ignore and any(fnmatch.fnmatchcase(path, pattern) for pattern in ignore):
        return
    where = path or "<root>"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            out.append(f"{where}: {_kind(a)} vs {_kind(b)}")
        else:
            problem = _tensor_difference(a, b, atol, rtol)
            if problem:
                out.append(f"{where}: {problem}")
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        keys_a, keys_b = set(a), set(b)
        if keys_a != keys_b:
            out.append(f"{where}: keys only in a {_keys(keys_a - keys_b)}, only in b {_keys(keys_b - keys_a)}")
        for key in sorted(keys_a & keys_b, key=str):
            _compare(a[key], b[key], f"{path}.{key}" if path else str(key), out, atol, rtol, ignore)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{path}.{i}" if path else str(i), out, atol, rtol, ignore)
    elif _is_array(a) and _is_array(b):
        try:
            _compare(torch.from_numpy(a.copy()), torch.from_numpy(b.copy()), path, out, atol, rtol, ignore)
        except TypeError:  # a dtype torch has no counterpart for (strings, objects)
            if (a.dtype, a.shape) != (b.dtype, b.shape) or a.tobytes() != b.tobytes():
                out.append(f"{where}: array {a.dtype}{a.shape} vs {b.dtype}{b.shape} (contents differ)")
    elif not _plain_equal(a, b, atol, rtol):
        out.append(f"{where}: {_short(a)} vs {_short(b)}")


def _tensor_difference(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> str | None:
    a, b = _local(a), _local(b)
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.device.type == "meta" or b.device.type == "meta":
        return None if a.device == b.device else f"device {a.device} vs {b.device}"
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.numel() == 0:
        return None
    if atol or rtol:
        differs = ~torch.isclose(a, b, atol=atol, rtol=rtol, equal_nan=True)
    else:
        differs = (_bytes(a) != _bytes(b)).any(dim=-1)
    count = int(differs.sum())
    if count == 0:
        return None
    index = tuple(int(i) for i in torch.nonzero(differs)[0]) if a.dim() else ()
    if a.is_floating_point() or a.is_complex():
        gap = (a.double() - b.double()).abs() if not a.is_complex() else (a - b).abs().double()
        gap = torch.where(differs, gap.nan_to_num(nan=math.inf), 0)  # equal NaNs are no difference
        where_max = tuple(int(i) for i in torch.nonzero(gap == gap.max())[0]) if a.dim() else ()
        detail = f", max abs diff {gap.max().item():.6g} at {where_max}"
    elif a.dtype == torch.bool:
        detail = ""
    else:
        detail = f", max abs diff {int((a.long() - b.long()).abs().max())}"
    first = f"a[{index}]={a[index].item()!r}, b[{index}]={b[index].item()!r}" if a.dim() else \
        f"a={a.item()!r}, b={b.item()!r}"
    return f"{count} of {a.numel()} elements differ{detail} (first: {first})"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of each element as a trailing dimension (bit identity: NaN payloads and signed zeros count)."""
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8).reshape(*t.shape, flat.element_size())


def _local(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)  # a DTensor: gather the shards (collective)
    return full_tensor() if callable(full_tensor) else t


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while isinstance(getattr(module, "module", None), torch.nn.Module) and type(module).__name__ in _WRAPPERS:
        module = module.module
    return module


_WRAPPERS = {"DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "_StepDispatcher"}


def _plain_equal(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if type(a) is not type(b) and not (_is_number(a) and _is_number(b)):
        return False
    if isinstance(a, float) or isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol) if (atol or rtol) else \
            (a == b and math.copysign(1.0, a) == math.copysign(1.0, b))
    try:
        return bool(a == b)
    except Exception:  # objects whose == is elementwise or undefined
        return a is b


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_array(x: Any) -> bool:
    return type(x).__module__ == "numpy" and type(x).__name__ == "ndarray"


def _kind(x: Any) -> str:
    return f"tensor{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _keys(keys: set[Any]) -> list[Any]:
    return sorted(keys, key=str)[:_MAX_LISTED]


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_tolerances(atol: float, rtol: float) -> None:
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}={value!r} is not valid; pass a number >= 0 (0 means bit-identical).")


def _raise_if_different(problems: list[str], title: str) -> None:
    if not problems:
        return
    listed = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - len(listed)} more" if len(problems) > len(listed) else ""
    raise AssertionError(f"{title} in {len(problems)} place(s):\n  " + "\n  ".join(listed) + more)
