"""DeviceStatsMonitor: CPU stats through psutil logged on logging steps, read back from CSV."""

from __future__ import annotations

import csv
import os

import pytest
from conftest import TinyModule

from callbacks.device_stats_monitor import DeviceStatsMonitor, get_cpu_stats
from framework.loggers import CSVLogger

pytest.importorskip("psutil")


def test_cpu_stats_logged_on_logging_steps(make_trainer, make_loader, tmp_path):
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(max_epochs=1, callbacks=[DeviceStatsMonitor()], logger=logger, log_every_n_steps=2)
    trainer.fit(TinyModule(), make_loader(num_samples=24), make_loader(num_samples=8))
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    start = "DeviceStatsMonitor.on_train_batch_start/cpu_percent"
    end = "DeviceStatsMonitor.on_train_batch_end/cpu_vm_percent"
    assert {start, end, "DeviceStatsMonitor.on_train_batch_start/cpu_swap_percent"} <= set(rows[0])
    start_steps = [int(r["step"]) for r in rows if r[start]]
    assert start_steps == [1, 3, 5]  # before the 2nd, 4th, 6th optimizer step, as Lightning
    assert all(0 <= float(r[end]) <= 100 for r in rows if r[end])


def test_cpu_stats_disabled_logs_nothing_on_cpu(make_trainer, make_loader, tmp_path):
    logger = CSVLogger(tmp_path)
    make_trainer(callbacks=[DeviceStatsMonitor(cpu_stats=False)], logger=logger, log_every_n_steps=1).fit(
        TinyModule(), make_loader())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        assert not any(key.startswith("DeviceStatsMonitor") for key in next(csv.reader(f)))


def test_requires_a_logger_and_valid_argument(make_trainer, make_loader):
    with pytest.raises(ValueError, match="logger=False"):
        make_trainer(callbacks=[DeviceStatsMonitor()]).fit(TinyModule(), make_loader())
    with pytest.raises(TypeError, match="cpu_stats"):
        DeviceStatsMonitor(cpu_stats="yes")
    assert set(get_cpu_stats()) == {"cpu_vm_percent", "cpu_percent", "cpu_swap_percent"}
