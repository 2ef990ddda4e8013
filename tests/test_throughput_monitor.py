"""ThroughputMonitor and framework.throughput: exact window arithmetic, FLOP counting, rates in a real fit."""

from __future__ import annotations

import csv
import os
import time

import pytest
import torch
from conftest import TinyModule
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks.throughput_monitor import ThroughputMonitor
from framework.loggers import CSVLogger
from framework.throughput import Throughput, get_available_flops, measure_flops


def test_window_rates_exact():
    tp = Throughput(available_flops=100.0, world_size=2, window_size=3)
    for i in range(4):  # the window keeps updates 1..3
        tp.update(time=float(i), batches=i + 1, samples=4 * (i + 1), lengths=40 * (i + 1), flops=5.0)
    metrics = tp.compute()
    assert metrics == {
        "time": 3.0, "batches": 4, "samples": 16, "lengths": 160,
        "device/batches_per_sec": 1.0, "device/samples_per_sec": 4.0, "batches_per_sec": 2.0,
        "samples_per_sec": 8.0, "device/items_per_sec": 40.0, "items_per_sec": 80.0,
        "flops_per_sec": 10.0, "device/flops_per_sec": 5.0, "device/mfu": 0.05,
    }


def test_window_not_full_gives_counters_only_and_checks():
    tp = Throughput(window_size=5)
    tp.update(time=0.5, batches=1, samples=2)
    assert tp.compute() == {"time": 0.5, "batches": 1, "samples": 2}
    with pytest.raises(ValueError, match="decrease"):
        tp.update(time=0.1, batches=2, samples=4)
    with pytest.raises(ValueError, match="samples"):
        tp.update(time=1.0, batches=3, samples=2)
    with pytest.raises(ValueError, match="window_size"):
        Throughput(window_size=1)


def test_measure_flops_of_a_linear_layer():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    assert measure_flops(layer, lambda: layer(x)) == 2 * 2 * 4 * 3
    assert measure_flops(layer, lambda: layer(x), lambda y: y.sum()) == 2 * 2 * 2 * 4 * 3  # + weight grads
    x.requires_grad_(True)
    assert measure_flops(layer, lambda: layer(x), lambda y: y.sum()) == 3 * 2 * 2 * 4 * 3  # + input grads
    with torch.device("meta"):
        big = torch.nn.Linear(1024, 1024)
        assert measure_flops(big, lambda: big(torch.empty(8, 1024))) == 2 * 8 * 1024 * 1024
    assert get_available_flops(torch.device("cpu"), torch.float32) is None


@pytest.mark.parametrize(("name", "dtype", "peak"), [
    ("NVIDIA H200", torch.bfloat16, 989.4e12), ("NVIDIA A100-SXM4-80GB", torch.float16, 312e12),
    ("Tesla T4", torch.float16, 65e12), ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA L40S", torch.bfloat16, None), ("NVIDIA A10G", torch.float64, None)])
def test_peak_flops_by_device_name(name, dtype, peak):
    from framework.throughput import _peak_for_name

    assert _peak_for_name(name, dtype) == peak
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: the tensor-core peak counts
        assert _peak_for_name("NVIDIA A100-PCIE-40GB", torch.float32) == 156e12
        torch.set_float32_matmul_precision("highest")
        assert _peak_for_name("NVIDIA A100-PCIE-40GB", torch.float32) == 19.5e12
    finally:
        torch.set_float32_matmul_precision(old)


def read_rows(logger):
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_fit_logs_rates_items_and_mfu(make_trainer, make_loader, tmp_path):
    logger = CSVLogger(tmp_path)
    monitor = ThroughputMonitor(length_fn=lambda batch: 10 * len(batch[0]), flops_per_batch=1e6,
                                available_flops=1e9, window_size=3)
    make_trainer(max_epochs=1, callbacks=[monitor], logger=logger, log_every_n_steps=1).fit(
        TinyModule(), make_loader(num_samples=24, batch_size=4))
    rows = [r for r in read_rows(logger) if r.get("train/samples")]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [int(float(r["train/samples"])) for r in rows] == [4, 8, 12, 16, 20, 24]
    assert [int(float(r["train/lengths"])) for r in rows][-1] == 240
    full = [r for r in rows if r["train/device/samples_per_sec"]]
    assert len(full) == 4  # once the window of 3 is full
    for r in full:
        samples_per_sec = float(r["train/device/samples_per_sec"])
        assert float(r["train/device/batches_per_sec"]) == pytest.approx(samples_per_sec / 4)
        assert float(r["train/device/items_per_sec"]) == pytest.approx(samples_per_sec * 10)
        assert float(r["train/device/flops_per_sec"]) == pytest.approx(samples_per_sec / 4 * 1e6)
        assert float(r["train/device/mfu"]) == pytest.approx(float(r["train/device/flops_per_sec"]) / 1e9)


def test_measured_flops_match_the_counter(make_trainer, make_loader, tmp_path):
    monitor = ThroughputMonitor(flops_per_batch="measure", window_size=2)
    module = TinyModule()
    make_trainer(callbacks=[monitor], logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(
        module, make_loader(num_samples=16, batch_size=4))
    x, y = torch.randn(4, 4), torch.randn(4, 1)
    expected = measure_flops(module, lambda: module(x), lambda out: torch.nn.functional.mse_loss(out, y))
    assert monitor._measured == expected == 2 * 2 * 4 * 4 * 1  # forward + weight gradients


class SlowValidation(TinyModule):
    def validation_step(self, batch, batch_idx):
        time.sleep(0.1)
        super().validation_step(batch, batch_idx)


def test_validation_time_is_not_training_time(make_trainer, make_loader, tmp_path):
    logger = CSVLogger(tmp_path)
    monitor = ThroughputMonitor(window_size=2)
    start = time.perf_counter()
    make_trainer(max_epochs=2, callbacks=[monitor], logger=logger, log_every_n_steps=1).fit(
        SlowValidation(), make_loader(num_samples=8), make_loader(num_samples=8))
    wall = time.perf_counter() - start
    rows = read_rows(logger)
    train_time = max(float(r["train/time"]) for r in rows if r.get("train/time"))
    assert wall > 0.4 and train_time < wall - 0.35  # 4 validation batches of 0.1 s are left out
    validate = [r for r in rows if r.get("validate/batches")]
    assert [int(float(r["validate/batches"])) for r in validate] == [1, 2, 1, 2]


def test_test_and_predict_stages(make_trainer, make_loader, tmp_path):
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(callbacks=[ThroughputMonitor(window_size=2)], logger=logger, log_every_n_steps=1)
    module = TinyModule()
    trainer.test(module, make_loader(num_samples=12))
    trainer.predict(module, make_loader(num_samples=12))
    logger.save()
    keys = set().union(*(k for r in read_rows(logger) for k in [{k for k, v in r.items() if v}]))
    assert {"test/samples", "test/device/samples_per_sec", "predict/batches", "predict/device/batches_per_sec"} <= keys


def test_bad_arguments():
    with pytest.raises(ValueError, match="flops_per_batch"):
        ThroughputMonitor(flops_per_batch=-1)
    with pytest.raises(TypeError, match="batch_size_fn"):
        ThroughputMonitor(batch_size_fn=4)
    with pytest.raises(ValueError, match="window_size"):
        ThroughputMonitor(window_size=1)


@settings(max_examples=50, deadline=None)
@given(dt=st.floats(0.001, 10.0), batch=st.integers(1, 512), items=st.integers(1, 64), window=st.integers(2, 20),
       extra=st.integers(0, 30), world=st.integers(1, 8))
def test_steady_rates_are_exact(dt, batch, items, window, extra, world):
    """With a constant batch time the window's rates are the per-batch ones, whatever the window."""
    tp = Throughput(available_flops=1e12, world_size=world, window_size=window)
    for i in range(1, window + extra + 1):
        tp.update(time=i * dt, batches=i, samples=i * batch, lengths=i * batch * items, flops=1e9)
    metrics = tp.compute()
    assert metrics["device/batches_per_sec"] == pytest.approx(1 / dt)
    assert metrics["device/samples_per_sec"] == pytest.approx(batch / dt)
    assert metrics["device/items_per_sec"] == pytest.approx(batch * items / dt)
    assert metrics["device/flops_per_sec"] == pytest.approx(1e9 / dt)
    assert metrics["device/mfu"] == pytest.approx(1e9 / dt / 1e12)
    assert ("samples_per_sec" in metrics) is (world > 1)
