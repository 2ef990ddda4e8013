"""Every package and public module imports first, alone, with no other Kiln module loaded (no import cycles).

Each module is imported in its own child of an interpreter that has loaded torch and nothing of Kiln (a
fork per module keeps this cheap); the three packages are also imported in truly fresh interpreters.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("framework", "callbacks", "strategies")
OPTIONAL = ("deepspeed", "torch_xla", "mlflow", "jsonargparse")


def _public_modules() -> list[str]:
    names = list(PACKAGES)
    for package in PACKAGES:
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if not any(part.startswith("_") for part in info.name.split(".")[1:]):
                names.append(info.name)
    return sorted(names)


_FORKER = """
import importlib, os, sys, traceback
import torch  # loaded once; every child starts with no Kiln module imported
OPTIONAL = sys.argv[1].split(',')
assert not any(m.split('.')[0] in ('framework', 'callbacks', 'strategies') for m in sys.modules)
failed = []
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if (exc.name or '').split('.')[0] not in OPTIONAL:
                traceback.print_exc()
                os._exit(1)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print('FAILED', failed)
sys.exit(1 if failed else 0)
"""


def test_every_public_module_imports_first_and_alone():
    modules = _public_modules()
    assert len(modules) > 40
    proc = subprocess.run([sys.executable, "-c", _FORKER, ",".join(OPTIONAL), *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.parametrize("statement", ["from strategies import DDPStrategy", "from callbacks import ModelCheckpoint",
                                       "from framework import Trainer, TrainModule, DataModule"])
def test_the_first_line_of_a_script_imports_in_a_fresh_interpreter(statement):
    subprocess.run([sys.executable, "-c", statement], cwd=ROOT, check=True, timeout=300)
