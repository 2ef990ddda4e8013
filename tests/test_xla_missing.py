"""Asking for XLA without torch_xla installed fails at construction with an install hint.

torch_xla is hidden through ``sys.modules`` so the test means the same in the XLA environment.
"""

from __future__ import annotations

import sys

import pytest

from framework import Trainer


@pytest.fixture
def no_torch_xla(monkeypatch):
    for name in [n for n in sys.modules if n == "torch_xla" or n.startswith("torch_xla.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # `import torch_xla` now raises ModuleNotFoundError


@pytest.mark.parametrize("build", [
    lambda: Trainer(strategy="xla", max_epochs=1, logger=False),
    lambda: Trainer(accelerator="tpu", max_epochs=1, logger=False),
    lambda: __import__("strategies").XLAStrategy(),
], ids=["strategy-name", "accelerator-tpu", "class"])
def test_xla_without_torch_xla_says_how_to_install_it(no_torch_xla, build):
    with pytest.raises(ModuleNotFoundError, match=r"needs torch_xla, which is not installed") as info:
        build()
    message = str(info.value)
    assert "pip install" in message and "torch_xla==" in message and "PJRT_DEVICE" in message
