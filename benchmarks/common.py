"""Shared helpers for the benchmark scripts: interleaved repeats, medians, tables, machine info.

Every benchmark runs its contenders interleaved (A, B, C, A, B, C, ...), rotating the order each
round so that no contender always runs first or last, and reports medians, so that drift in the
machine's speed (thermal, other load) hits every contender alike.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

# Running as `python benchmarks/x.py` puts benchmarks/ on sys.path, not the repo root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(1, REPO_ROOT)


def is_installed(module: str) -> bool:
    """True if `module` can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def interleaved(runners: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run every runner `repeats` times, round-robin, rotating the start each round."""
    names = list(runners)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_idx in range(repeats):
        shift = round_idx % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(runners[name]())
    return results


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(values: Sequence[float], baseline: Sequence[float]) -> float:
    """Median over rounds of value/baseline: each round's pair ran close together in time."""
    return statistics.median(v / b for v, b in zip(values, baseline, strict=True))


def machine_info() -> dict[str, Any]:
    """Versions and hardware, so that a result can be reproduced or discounted."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    for dist in ("torch", "pytorch-lightning", "accelerate", "kiln"):
        info[dist] = _dist_version(dist)
    return info


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "—" if value is None else str(value)


def emit(result: dict[str, Any], as_json: bool, table: str) -> None:
    """Print `result` as JSON (machine-readable) or the table with the machine info under it."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(table)
    info = result.get("machine", {})
    print("\n" + ", ".join(f"{k}={v}" for k, v in info.items() if v is not None))
