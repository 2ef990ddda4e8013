"""The metrics table that ``trainer.validate``/``trainer.test`` print (Lightning's plain-text layout).

One column per dataloader (``DataLoader i``), one row per metric name (the ``/dataloader_idx_i`` suffix
dropped), sorted by name; columns that do not fit the terminal continue in a further table.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any


def format_results_table(results: Sequence[Mapping[str, Any]], stage: str, width: int | None = None) -> str:
    """The table as text ("" when there are no metrics); ``width`` defaults to the terminal's (120 if unknown)."""
    results = [{key.split("/dataloader_idx_")[0]: value for key, value in r.items()} for r in results]
    names = sorted({key for r in results for key in r})
    if not names:
        return ""
    headers = [f"DataLoader {i}" for i in range(len(results))]
    term = width or shutil.get_terminal_size(fallback=(120, 30)).columns or 120
    cell = int(min(max(len(max(names, key=len)), len(max(headers, key=len)), 25), term / 2))
    rows = {name: [_cell(r[name]) if name in r else " " for r in results] for name in names}
    per_table = max(int((term - cell) / cell), 1)
    bar = ("─" if _can_encode("─") else "-") * term
    half = int(term / 2)
    tables = []
    for start in range(0, len(headers), per_table):
        cols = [f"{stage} Metric".capitalize(), *headers[start:start + per_table]]
        fmt = f"{{:^{cell}}}" * len(cols)
        lines = [bar, fmt.format(*cols).rstrip(), bar]
        for name in names:
            values = rows[name][start:start + per_table]
            label = name
            while len(label) > half:  # a long name wraps onto further lines
                lines.append(fmt.format(label[:half], *values).rstrip())
                label, values = label[half:], [" "] * len(values)
            lines.append(fmt.format(label, *values).rstrip())
        lines.append(bar)
        tables.append(os.linesep.join(lines))
    return os.linesep.join(tables)


def print_results(results: Sequence[Mapping[str, Any]], stage: str, is_global_zero: bool = True) -> None:
    """Print the table on global rank 0 (``trainer.validate/test(verbose=True)``)."""
    if is_global_zero:
        text = format_results_table(results, stage)
        if text:
            print(text, flush=True)


def _cell(value: Any) -> str:
    if hasattr(value, "numel") and hasattr(value, "tolist"):  # a tensor: its number or its list
        value = value.item() if value.numel() == 1 else value.tolist()
    return f"{value}"


def _can_encode(char: str) -> bool:
    encoding = getattr(sys.stdout, "encoding", None)
    if encoding is None:
        return True
    try:
        char.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True
