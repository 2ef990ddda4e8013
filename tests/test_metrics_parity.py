"""The same model logging the same values on the same data reports the same numbers on Kiln and Lightning
(same keys everywhere; values equal up to float32 rounding).

tests/scripts/log_parity.py runs one small model that logs in every way ``self.log`` offers (step/epoch
forks, sum/max/min, log_dict, prog_bar, logger=False, numbers, bools, torchmetrics, two validation
loaders, epoch-hook logging) under either framework. Each run is a fresh process. Lightning comes from
``$KILN_LIGHTNING_PYTHON`` or /work/venvs/lightning/bin/python (pytorch_lightning 2.5); without it the
tests are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "log_parity.py"
ROOT = Path(__file__).resolve().parents[1]


def _lightning_python() -> str | None:
    for candidate in (os.environ.get("KILN_LIGHTNING_PYTHON"), "/work/venvs/lightning/bin/python"):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import pytorch_lightning"], capture_output=True, timeout=120)
            if probe.returncode == 0:
                return candidate
    return None


LIGHTNING = _lightning_python()
pytestmark = pytest.mark.skipif(LIGHTNING is None, reason="needs a python with pytorch_lightning 2.x "
                                "(set KILN_LIGHTNING_PYTHON)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, bool], dict]:
    """Both frameworks' reports (explicit and inferred batch sizes), from two processes run side by side."""
    out = tmp_path_factory.mktemp("parity")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {}
    for framework, python in (("kiln", sys.executable), ("lightning", LIGHTNING)):
        path = out / f"{framework}.json"
        procs[framework] = (subprocess.Popen([python, str(SCRIPT), framework, str(path)], cwd=out, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), path)
    results = {}
    for framework, (proc, path) in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{framework} failed:\n{output[-3000:]}"
        report = json.loads(path.read_text())
        results[(framework, True)], results[(framework, False)] = report["explicit"], report["inferred"]
    return results


def assert_same_report(kiln, lightning, path: str = "report") -> None:
    """Same keys everywhere, same numbers: equal up to float32 rounding (Kiln fuses the weighted
    multiply-add of an epoch mean, Lightning rounds twice: the last bits can differ)."""
    assert type(kiln) is type(lightning), path
    if isinstance(kiln, dict):
        assert sorted(kiln) == sorted(lightning), path
        for key in kiln:
            assert_same_report(kiln[key], lightning[key], f"{path}[{key!r}]")
    elif isinstance(kiln, list):
        assert len(kiln) == len(lightning), path
        for i, (a, b) in enumerate(zip(kiln, lightning)):
            assert_same_report(a, b, f"{path}[{i}]")
    else:
        assert kiln == pytest.approx(lightning, rel=2e-6, abs=1e-7), path


def _split_validate_after_fit(result: dict) -> tuple[dict, dict]:
    """The snapshot taken by trainer.validate() after fit, apart from the rest."""
    rest = {**result, "validation": result["validation"][:-1]}
    return rest, result["validation"][-1]


def test_explicit_batch_sizes_report_lightnings_numbers(runs):
    kiln, after_fit_kiln = _split_validate_after_fit(runs[("kiln", True)])
    lightning, after_fit_lightning = _split_validate_after_fit(runs[("lightning", True)])
    assert_same_report(kiln, lightning)
    assert_same_report({k: after_fit_kiln[k] for k in after_fit_lightning}, after_fit_lightning)


def test_inferred_batch_sizes_report_lightnings_numbers(runs):
    kiln, _ = _split_validate_after_fit(runs[("kiln", False)])
    lightning, _ = _split_validate_after_fit(runs[("lightning", False)])
    assert_same_report(kiln, lightning)


def test_each_trainer_run_starts_with_empty_callback_metrics(runs):
    _, kiln = _split_validate_after_fit(runs[("kiln", True)])
    _, lightning = _split_validate_after_fit(runs[("lightning", True)])
    assert_same_report(kiln, lightning)
