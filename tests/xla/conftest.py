"""Tests of XLAStrategy on torch_xla's PJRT device; run them with `nox -s xla` (PJRT_DEVICE=CPU).

The normal test environment has no torch_xla: every module here is then reported as skipped, with the
reason, without being imported (a module-level skip in a conftest breaks `pytest tests/xla`).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

REASON = ("torch_xla is not installed: the XLA tests run in their own environment "
          "(`nox -s xla`: torch==2.9.0 + torch_xla==2.9.0, PJRT_DEVICE=CPU)")

if importlib.util.find_spec("torch_xla") is None:

    class _SkippedModule(pytest.Module):
        def collect(self):
            pytest.skip(REASON)

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedModule.from_parent(parent, path=module_path)

else:
    os.environ.setdefault("PJRT_DEVICE", "CPU")  # before torch_xla picks a device
