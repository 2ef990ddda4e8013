"""Reading back what the loggers wrote: TensorBoard scalars, CSV rows, a remote log dir copied locally
(tests/test_loggers*.py)."""

from __future__ import annotations

import csv
import io
import os

import fsspec


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def download(url: str, local_dir) -> str:
    fs, root = fsspec.core.url_to_fs(url)
    for remote in fs.find(root):
        rel = remote[len(root.rstrip("/")) + 1 :]
        local = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(remote, local)
    return str(local_dir)
