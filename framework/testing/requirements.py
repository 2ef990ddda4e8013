"""``require_*`` decorators: skip a test, with the reason, when hardware or a package is missing."""

from __future__ import annotations

import importlib.util
import unittest
from collections.abc import Callable


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _dtype_works(dtype_name: str) -> bool:
    """A half-precision matmul under autocast works on the default accelerator (CUDA, else CPU)."""
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return False
    try:
        with torch.autocast(device, dtype=dtype):
            out = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        return out.dtype == dtype
    except (RuntimeError, TypeError):
        return False


def _dist_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def _skip_unless(condition: Callable[[], bool], reason: str) -> Callable[[Callable], Callable]:
    return unittest.skipUnless(condition(), reason)


def require_cuda(test: Callable) -> Callable:
    """Skip unless a CUDA device is available."""
    return _skip_unless(lambda: _cuda_count() > 0, "needs a CUDA device")(test)


def require_multi_device(test: Callable) -> Callable:
    """Skip unless at least two accelerator devices (CUDA) are available."""
    return _skip_unless(lambda: _cuda_count() > 1, "needs at least two CUDA devices")(test)


def require_fp16(test: Callable) -> Callable:
    """Skip unless float16 autocast works on the default accelerator."""
    return _skip_unless(lambda: _dtype_works("float16"), "needs float16 autocast support")(test)


def require_bf16(test: Callable) -> Callable:
    """Skip unless bfloat16 autocast works on the default accelerator."""
    return _skip_unless(lambda: _dtype_works("bfloat16"), "needs bfloat16 support")(test)


def require_deepspeed(test: Callable) -> Callable:
    """Skip unless deepspeed is installed."""
    return _skip_unless(lambda: _has_module("deepspeed"), "needs deepspeed (pip install 'kiln[deepspeed]')")(test)


def require_xla(test: Callable) -> Callable:
    """Skip unless torch_xla is installed."""
    return _skip_unless(lambda: _has_module("torch_xla"), "needs torch_xla (pip install 'kiln[xla]')")(test)


def require_distributed(test: Callable) -> Callable:
    """Skip unless torch.distributed with the gloo backend is available (multi-process CPU tests)."""
    return _skip_unless(_dist_available, "needs torch.distributed with gloo")(test)
