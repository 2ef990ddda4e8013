"""Capture and restore every random number generator a training process draws from.

The captured state is a checkpoint-safe tree (dicts, lists, str/int/float/None and CPU tensors):
checkpoints never pickle. Each backend appears only when it is present and initialised, so capturing
never initialises CUDA/XPU in a process that has not used it.
"""

from __future__ import annotations

import random
import sys
import warnings
from typing import Any

import numpy as np
import torch


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _set_python_state(state: dict[str, Any]) -> None:
    internal = tuple(int(v) for v in state["state"].tolist())
    random.setstate((int(state["version"]), internal, state["gauss_next"]))


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            state["bit_generator"],
            keys,
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    )


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _xpu_ready() -> bool:
    xpu = getattr(torch, "xpu", None)
    return xpu is not None and xpu.is_available() and xpu.is_initialized()


def _mps_ready() -> bool:
    return torch.backends.mps.is_available()


def _xla_model():
    # Only when the process already uses torch_xla: importing it is slow and grabs devices.
    if "torch_xla" not in sys.modules:
        return None
    import torch_xla.core.xla_model as xm

    return xm


def capture_rng_state() -> dict[str, Any]:
    """The state of python ``random``, numpy's global generator, torch CPU and (when in use) every
    CUDA/XPU device, MPS and XLA generator, as a checkpoint-safe tree."""
    state: dict[str, Any] = {
        "python": _python_state(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if _cuda_ready():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    if _xpu_ready():
        state["xpu"] = [s.cpu() for s in torch.xpu.get_rng_state_all()]
    if _mps_ready():
        state["mps"] = torch.mps.get_rng_state().cpu()
    xm = _xla_model()
    if xm is not None:
        state["xla"] = int(xm.get_rng_state())
    return state


def _restore_devices(name: str, saved: list[torch.Tensor], available: bool, count: int, setter) -> None:
    if not available:
        warnings.warn(
            f"the checkpoint holds {name.upper()} RNG states but {name.upper()} is not available here; "
            f"they are not restored, so {name.upper()}-side randomness will differ from the saved run.",
            stacklevel=3,
        )
        return
    if len(saved) != count:
        warnings.warn(
            f"the checkpoint holds RNG states for {len(saved)} {name.upper()} devices but this process "
            f"sees {count}; restoring the first {min(len(saved), count)}.",
            stacklevel=3,
        )
    for index, device_state in enumerate(saved[:count]):
        setter(device_state, index)


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned.

    Backends missing from ``state`` are left alone; backends in ``state`` that this process cannot
    use (a GPU checkpoint resumed on CPU) are skipped with a warning.
    """
    if not isinstance(state, dict):
        raise TypeError(
            f"state={type(state).__name__} is not a dict; pass the value returned by capture_rng_state()."
        )
    unknown = set(state) - {"python", "numpy", "torch", "cuda", "xpu", "mps", "xla"}
    if unknown:
        raise ValueError(
            f"state has unknown keys {sorted(unknown)}; pass the value returned by capture_rng_state()."
        )
    if "python" in state:
        _set_python_state(state["python"])
    if "numpy" in state:
        _set_numpy_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
        _restore_devices("cuda", state["cuda"], available, count, torch.cuda.set_rng_state)
    if "xpu" in state:
        xpu = getattr(torch, "xpu", None)
        available = xpu is not None and xpu.is_available()
        count = xpu.device_count() if available else 0
        _restore_devices("xpu", state["xpu"], available, count, xpu.set_rng_state if available else None)
    if "mps" in state:
        if _mps_ready():
            torch.mps.set_rng_state(state["mps"].cpu())
        else:
            _restore_devices("mps", [state["mps"]], False, 0, None)
    if "xla" in state:
        xm = _xla_model()
        if xm is None:
            _restore_devices("xla", [state["xla"]], False, 0, None)
        else:
            xm.set_rng_state(int(state["xla"]))
