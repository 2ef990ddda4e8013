"""framework's public names: lazy, importable first and alone in a fresh interpreter (no import cycle)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Each of these pulls in the others of this issue (hparams, loading, codec, module_utils, batch_transfer,
# rank_zero); ``framework`` itself is checked by the lazy test below.
FIRST_IMPORTS = ["callbacks", "strategies", "framework.datamodule", "framework.module", "framework.utilities"]


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          check=True).stdout.strip()


def test_every_module_imports_first_and_alone():
    code = ("import importlib, subprocess, sys\n"
            f"for name in {FIRST_IMPORTS!r}:\n"
            "    r = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
            "    print(name, r.returncode, r.stderr.strip().splitlines()[-1:] )\n")
    lines = run(code).splitlines()
    assert [line.split()[1] for line in lines] == ["0"] * len(FIRST_IMPORTS), lines


def test_import_framework_is_lazy_and_names_resolve():
    out = run("import sys, framework; lazy = 'framework.trainer' not in sys.modules; "
              "from framework import (TrainModule, DataModule, Trainer, seed_everything, DistributedState, "
              "AttributeDict, rank_zero_only, rank_zero_info, rank_zero_warn, rank_zero_debug, callbacks); "
              "print(lazy, Trainer.__module__, callbacks.Callback.__name__, sorted(framework.__all__) == "
              "sorted(set(framework.__all__)))")
    assert out == "True framework.trainer Callback True"


def test_unknown_name_is_an_ordinary_attribute_error():
    import framework

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        framework.nope  # noqa: B018


def test_lightning_import_paths(capsys):
    from framework import DataModule, TrainModule, cli_lightning_logo
    from framework.core import DataModule as CoreDataModule
    from framework.core import TrainModule as CoreTrainModule
    from framework.utilities import AttributeDict, move_data_to_device, rank_zero_only
    from framework.utilities.exceptions import MisconfigurationException
    from framework.utilities.imports import _TORCHVISION_AVAILABLE

    assert (CoreTrainModule, CoreDataModule) == (TrainModule, DataModule)
    from framework.exceptions import MisconfigurationException as KilnMisconfiguration

    assert MisconfigurationException is KilnMisconfiguration
    cli_lightning_logo()
    assert "Kiln" in capsys.readouterr().out

    assert rank_zero_only.rank == 0 and AttributeDict(a=1).a == 1 and callable(move_data_to_device)
    assert isinstance(_TORCHVISION_AVAILABLE, bool)
