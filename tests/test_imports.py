"""Every package and public module imports first, alone, in a fresh interpreter (no import cycles)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("framework", "callbacks", "strategies")


def _public_modules() -> list[str]:
    names = list(PACKAGES)
    for package in PACKAGES:
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if not any(part.startswith("_") for part in info.name.split(".")[1:]):
                names.append(info.name)
    return sorted(names)


MODULES = _public_modules()


def test_every_public_module_imports_first_in_a_fresh_interpreter():
    """One interpreter per module, run in parallel; deepspeed/torch_xla-only modules may say what is missing."""
    code = ("import importlib, sys\n"
            "try:\n    importlib.import_module(sys.argv[1])\n"
            "except ModuleNotFoundError as exc:\n"
            "    if exc.name.split('.')[0] not in ('deepspeed', 'torch_xla', 'mlflow', 'jsonargparse'): raise\n")
    from concurrent.futures import ThreadPoolExecutor

    def check(name: str) -> tuple[str, str | None]:
        proc = subprocess.run([sys.executable, "-c", code, name], cwd=ROOT, capture_output=True, text=True,
                              timeout=240)
        out = (proc.stdout + proc.stderr).strip()
        return name, (out.splitlines()[-1] if out else f"exit {proc.returncode}") if proc.returncode else None

    with ThreadPoolExecutor(max_workers=4) as pool:  # a few at a time: each interpreter loads torch
        failures = {name: error for name, error in pool.map(check, MODULES) if error}
    assert not failures, failures


@pytest.mark.parametrize("statement", ["from strategies import DDPStrategy", "from callbacks import ModelCheckpoint",
                                       "from framework import Trainer, TrainModule, DataModule"])
def test_the_first_line_of_a_script_imports(statement):
    subprocess.run([sys.executable, "-c", statement], cwd=ROOT, check=True, timeout=240)
