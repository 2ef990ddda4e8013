"""CSVLogger (framework/loggers/csv_logs.py): metrics.csv rows and growing header, buffering, continuing a file,
hparams.yaml, memory:// log dirs."""

from __future__ import annotations

import os

import fsspec
import torch
import yaml
from logger_files import read_csv

from framework.loggers import CSVLogger


def test_csv_experiment_writer(tmp_path):
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=10)
    logger.log_metrics({"a": 1.0}, step=0)
    writer = logger.experiment
    assert writer.metrics == [{"a": 1.0, "step": 0}]
    assert writer.metrics_file_path == os.path.join(logger.log_dir, "metrics.csv")
    logger.save()
    assert writer.metrics == [] and os.path.exists(writer.metrics_file_path)


def test_csv_rows_and_growing_header(tmp_path):
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=2)
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.log_metrics({"loss": 0.5}, step=1)  # flushed with header step,loss
    logger.log_metrics({"loss": 0.25, "val_acc": torch.tensor(0.75)}, step=2)
    logger.save()  # new column: file rewritten
    logger.log_metrics({"loss": 0.125}, step=3)
    logger.finalize("success")
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        text = f.read()
    assert text.splitlines()[0] == "step,loss,val_acc"
    rows = read_csv(text)
    assert [(r["step"], r["loss"], r["val_acc"]) for r in rows] == [
        ("0", "1.0", ""),
        ("1", "0.5", ""),
        ("2", "0.25", "0.75"),
        ("3", "0.125", ""),
    ]


def test_csv_buffers_until_flush(tmp_path):
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=3)
    logger.log_metrics({"loss": 1.0}, step=0)
    path = os.path.join(logger.log_dir, "metrics.csv")
    assert not os.path.exists(path)
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.log_metrics({"loss": 1.0}, step=2)
    assert len(read_csv(open(path).read())) == 3


def test_csv_continues_existing_file(tmp_path):
    first = CSVLogger(tmp_path, version=0)
    first.log_metrics({"a": 1.0}, step=0)
    first.finalize("success")
    second = CSVLogger(tmp_path, version=0)  # resume into the same version
    second.log_metrics({"b": 2.0}, step=1)
    second.finalize("success")
    rows = read_csv(open(os.path.join(second.log_dir, "metrics.csv")).read())
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [("0", "1.0", ""), ("1", "", "2.0")]


def test_csv_hparams(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_hyperparams({"lr": 0.01, "layers": [4, 8]})
    logger.log_hyperparams({"seed": 3})  # merged with the earlier call, as Lightning's
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f) == {"lr": 0.01, "layers": [4, 8], "seed": 3}


def test_csv_on_memory_url(memory_url):
    logger = CSVLogger(memory_url)
    logger.log_metrics({"loss": 2.0}, step=0)
    logger.log_hyperparams({"lr": 0.5})
    logger.save()
    assert logger.log_dir == f"{memory_url}/lightning_logs/version_0"
    with fsspec.open(f"{logger.log_dir}/metrics.csv", "r") as f:
        assert read_csv(f.read()) == [{"step": "0", "loss": "2.0"}]
    logger.log_metrics({"loss": 1.0, "acc": 0.5}, step=5)
    logger.finalize("success")
    with fsspec.open(f"{logger.log_dir}/metrics.csv", "r") as f:
        rows = read_csv(f.read())
    assert [(r["step"], r["acc"], r["loss"]) for r in rows] == [("0", "", "2.0"), ("5", "0.5", "1.0")]
    with fsspec.open(f"{logger.log_dir}/hparams.yaml", "r") as f:
        assert yaml.safe_load(f) == {"lr": 0.5}
    assert CSVLogger(memory_url).version == 1
