"""Import time of Kiln (`import framework, callbacks, strategies`) against `import torch`.

Each measurement is a fresh interpreter (start-up excluded) that imports torch, then the contender,
timing both parts; every contender imports torch first anyway, so the sum is its cold import time,
and the ratio sum / torch-part is taken within one process, which cancels most of the noise of a
shared machine. Wall and process CPU time are both reported. Runs are interleaved; the table shows
medians. Lightning and Accelerate are included when installed.

    python benchmarks/bench_import.py [--repeats 9] [--json] [--importtime]

Target (DESIGN.md §6): Kiln ≤ 1.15 × torch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass

from common import (
    REPO_ROOT,
    emit,
    format_table,
    interleaved,
    is_installed,
    machine_info,
    median,
)

TARGET_RATIO = 1.15
KILN = "framework, callbacks, strategies"
CONTENDERS = {  # label -> the modules of one import statement
    "torch": "torch",
    "kiln": KILN,
    "lightning": "pytorch_lightning",
    "accelerate": "accelerate",
}
TIMER = """
import time
w0, c0 = time.perf_counter(), time.process_time()
import torch
w1, c1 = time.perf_counter(), time.process_time()
import {modules}
w2, c2 = time.perf_counter(), time.process_time()
print(w1 - w0, w2 - w1, c1 - c0, c2 - c1)
"""


@dataclass
class Sample:
    """One fresh interpreter: seconds for `import torch`, then for the contender on top of it."""

    torch_wall: float
    extra_wall: float
    torch_cpu: float
    extra_cpu: float

    @property
    def wall(self) -> float:
        return self.torch_wall + self.extra_wall


def time_import(modules: str) -> Sample:
    out = subprocess.run(
        [sys.executable, "-c", TIMER.format(modules=modules)],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, check=True,
    )
    return Sample(*map(float, out.stdout.split()[-4:]))


def _env() -> dict[str, str]:
    # The repo root first, so the source tree is measured whether or not kiln is installed.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env


def slowest_own_imports(modules: str, top: int) -> list[tuple[int, str]]:
    """(self µs, module) of the slowest non-torch modules that `import <modules>` loads (-X importtime)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import torch; import {modules}"],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, check=True,
    )
    after_torch = out.stderr.split("| torch\n", 1)[-1]
    rows = []
    for line in after_torch.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        rows.append((int(self_us), name))
    return sorted(rows, reverse=True)[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Import time of Kiln vs torch, Lightning, Accelerate.")
    parser.add_argument("--repeats", type=int, default=9, help="fresh interpreters per contender (≥ 5)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--importtime", action="store_true", help="also list Kiln's slowest imports after torch")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats must be at least 5 for a meaningful median, got {args.repeats}")

    contenders = {
        label: modules for label, modules in CONTENDERS.items()
        if all(is_installed(m.strip()) for m in modules.split(","))
    }
    for modules in contenders.values():  # warm the OS file cache and bytecode caches
        time_import(modules)
    runs = interleaved({label: (lambda m=modules: time_import(m)) for label, modules in contenders.items()},
                       args.repeats)

    results = {
        label: {
            "median_ms": 1000 * median([s.wall for s in samples]),
            "extra_over_torch_ms": 1000 * median([s.extra_wall for s in samples]),
            "ratio_to_torch": median([s.wall / s.torch_wall for s in samples]),
            "cpu_ratio_to_torch": median([(s.torch_cpu + s.extra_cpu) / s.torch_cpu for s in samples]),
            "runs_ms": [1000 * s.wall for s in samples],
        }
        for label, samples in runs.items()
    }
    kiln_ratio = results["kiln"]["ratio_to_torch"]
    result = {"benchmark": "import", "repeats": args.repeats, "target_ratio": TARGET_RATIO,
              "meets_target": kiln_ratio <= TARGET_RATIO, "results": results, "machine": machine_info()}
    if args.importtime:
        result["kiln_slowest_imports_us"] = slowest_own_imports(KILN, top=12)

    rows = [(label, CONTENDERS[label], r["median_ms"], r["extra_over_torch_ms"], r["ratio_to_torch"],
             r["cpu_ratio_to_torch"]) for label, r in results.items()]
    table = format_table(["contender", "import", "median ms", "ms on top of torch", "× torch", "CPU × torch"], rows)
    table += (f"\n\nKiln / torch = {kiln_ratio:.3f} (target ≤ {TARGET_RATIO}: "
              f"{'met' if kiln_ratio <= TARGET_RATIO else 'MISSED'}); median of {args.repeats} fresh interpreters, "
              "interleaved; × torch = median over interpreters of (torch + contender) / torch.")
    if args.importtime:
        table += "\n\nSlowest imports after torch (self µs):\n" + "\n".join(
            f"  {us:>8}  {name}" for us, name in result["kiln_slowest_imports_us"])
    emit(result, args.json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
