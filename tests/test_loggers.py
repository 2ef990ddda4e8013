"""Loggers: what every logger shares (prefix, versions, ranks, hyperparameters, bad input), logger= resolution,
and a real Trainer.fit writing TensorBoard and CSV files that are read back.

Per-logger details: tests/test_loggers_tensorboard.py, tests/test_loggers_csv.py, tests/test_loggers_mlflow.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from conftest import TinyModule
from logger_files import download, read_csv, read_scalars
from torch.utils.data import DataLoader, TensorDataset

from framework import Trainer, TrainModule
from framework.loggers import CSVLogger, Logger, TensorBoardLogger, resolve_loggers
from framework.state import DistributedState


@pytest.fixture
def rank_one():
    DistributedState._reset_state()
    DistributedState(process_index=1, num_processes=2)
    yield
    DistributedState._reset_state()


@pytest.mark.parametrize("logger_cls", [TensorBoardLogger, CSVLogger])
def test_prefix(tmp_path, logger_cls):
    logger = logger_cls(tmp_path, prefix="run")
    logger.log_metrics({"loss": 1.0}, step=3)
    logger.finalize("success")
    if logger_cls is CSVLogger:
        assert read_csv(open(logger.experiment.metrics_file_path).read()) == [{"step": "3", "run-loss": "1.0"}]
    else:
        assert read_scalars(logger.log_dir) == {"run-loss": [(3, 1.0)]}


def test_hparams_namespace_and_unrepresentable_values(tmp_path):
    import argparse

    logger = CSVLogger(tmp_path)
    with pytest.warns(UserWarning, match="'fn'"):
        logger.log_hyperparams(argparse.Namespace(lr=0.5, path=tmp_path / "x", fn=object()))
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f) == {"lr": 0.5, "path": str(tmp_path / "x")}
    with pytest.raises(TypeError, match="log_hyperparams"):
        logger.log_hyperparams([1, 2])


def test_log_run_start_merges_module_and_datamodule(tmp_path):
    from framework import DataModule
    from framework.loggers import log_run_start

    class Module(TrainModule):
        def __init__(self, lr=0.1, shared=1):
            super().__init__()
            self.save_hyperparameters()

    class Data(DataModule):
        def __init__(self, batch_size=4, shared=1, log=True):
            super().__init__()
            self.save_hyperparameters(ignore="log", logger=log)

    logger = CSVLogger(tmp_path)
    log_run_start([logger], Module(), Data())
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f) == {"lr": 0.1, "shared": 1, "batch_size": 4}
    with pytest.raises(RuntimeError, match="shared"):
        log_run_start([logger], Module(shared=1), Data(shared=2))
    quiet = CSVLogger(tmp_path)  # save_hyperparameters(logger=False) / never called: nothing logged
    log_run_start([quiet], TrainModule(), Data(log=False))
    assert not os.path.exists(os.path.join(quiet.log_dir, "hparams.yaml"))


@pytest.mark.parametrize("logger_cls", [TensorBoardLogger, CSVLogger])
def test_versions_increment(tmp_path, logger_cls):
    versions = [logger_cls(tmp_path).version for _ in range(3)]
    assert versions == [0, 1, 2]
    assert sorted(os.listdir(tmp_path / "lightning_logs")) == ["version_0", "version_1", "version_2"]
    os.makedirs(tmp_path / "lightning_logs" / "version_7")
    os.makedirs(tmp_path / "lightning_logs" / "not_a_version")
    assert logger_cls(tmp_path).version == 8


@pytest.mark.parametrize(("version", "dirname"), [(3, "version_3"), ("run-a", "run-a")])
def test_explicit_version(tmp_path, version, dirname):
    logger = CSVLogger(tmp_path, name="x", version=version)
    assert logger.version == version
    assert logger.log_dir == os.path.join(tmp_path, "x", dirname)


@pytest.mark.usefixtures("rank_one")
@pytest.mark.parametrize("logger_cls", [TensorBoardLogger, CSVLogger])
def test_non_zero_rank_writes_nothing(tmp_path, logger_cls):
    logger = (
        logger_cls(tmp_path, flush_logs_every_n_steps=1) if logger_cls is CSVLogger else logger_cls(tmp_path)
    )
    logger.log_hyperparams({"lr": 1.0})
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.save()
    logger.finalize("success")
    assert logger.version == 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("logger_cls", [TensorBoardLogger, CSVLogger])
def test_non_numeric_metric_is_refused(tmp_path, logger_cls):
    with pytest.raises(ValueError, match="`loss`"):
        logger_cls(tmp_path).log_metrics({"loss": "low"}, step=0)


def test_bad_constructor_arguments(tmp_path):
    with pytest.raises(TypeError, match="save_dir"):
        CSVLogger(3)
    with pytest.raises(TypeError, match="version"):
        CSVLogger(tmp_path, version=1.5)
    with pytest.raises(ValueError, match="flush_logs_every_n_steps"):
        CSVLogger(tmp_path, flush_logs_every_n_steps=0)


def test_resolve_loggers(tmp_path):
    (default,) = resolve_loggers(True, str(tmp_path))
    assert isinstance(default, TensorBoardLogger)
    assert default.root_dir == os.path.join(tmp_path, "lightning_logs")
    assert resolve_loggers(False, tmp_path) == []
    assert resolve_loggers(None, tmp_path) == []
    csv_logger, tb_logger = CSVLogger(tmp_path), TensorBoardLogger(tmp_path)
    assert resolve_loggers(csv_logger, tmp_path) == [csv_logger]
    assert resolve_loggers([csv_logger, tb_logger], tmp_path) == [csv_logger, tb_logger]
    assert resolve_loggers((tb_logger,), tmp_path) == [tb_logger]
    assert resolve_loggers([], tmp_path) == []


@pytest.mark.parametrize("bad", ["tensorboard", 1, object(), {"a": 1}, [True], [CSVLogger("x"), "csv"]])
def test_resolve_loggers_rejects(bad):
    with pytest.raises(TypeError, match="`logger`") as info:
        resolve_loggers(bad, ".")
    assert "Logger" in str(info.value)


def test_base_logger_is_a_noop_sink():
    logger = Logger()
    logger.log_metrics({"a": 1.0}, step=0)
    logger.log_hyperparams({})
    logger.finalize("success")
    assert logger.log_dir is None


# ---- end to end: a real Trainer.fit writes what the files say -------------------------------------


class TinyRegression(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_tiny(**trainer_kwargs) -> Trainer:
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = Trainer(
        max_epochs=2,
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        **trainer_kwargs,
    )
    trainer.fit(TinyRegression(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return trainer


def test_fit_writes_tensorboard_and_csv(tmp_path):
    tb_logger, csv_logger = TensorBoardLogger(tmp_path), CSVLogger(tmp_path)
    trainer = fit_tiny(logger=[tb_logger, csv_logger], default_root_dir=tmp_path)
    scalars = read_scalars(tb_logger.log_dir)
    assert [step for step, _ in scalars["train_loss"]] == [2, 4, 6, 8]  # 4 batches x 2 epochs, every 2nd
    assert [step for step, _ in scalars["val_loss"]] == [4, 8]
    assert scalars["val_loss"][-1][1] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
    rows = read_csv(open(os.path.join(csv_logger.log_dir, "metrics.csv")).read())
    train_rows = [r for r in rows if r["train_loss"]]
    assert [int(r["step"]) for r in train_rows] == [2, 4, 6, 8]
    assert [float(r["train_loss"]) for r in train_rows] == pytest.approx(
        [v for _, v in scalars["train_loss"]]
    )
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [4, 8]


def test_fit_default_logger_is_tensorboard_under_default_root_dir(tmp_path):
    trainer = fit_tiny(default_root_dir=tmp_path)
    assert isinstance(trainer.logger, TensorBoardLogger)
    assert trainer.logger.log_dir == os.path.join(tmp_path, "lightning_logs", "version_0")
    assert set(read_scalars(trainer.logger.log_dir)) >= {"train_loss", "val_loss"}
    assert fit_tiny(default_root_dir=tmp_path).logger.version == 1


def test_fit_logs_to_memory_url(memory_url, tmp_path):
    trainer = fit_tiny(default_root_dir=memory_url)
    assert trainer.logger.log_dir == f"{memory_url}/lightning_logs/version_0"
    assert [step for step, _ in read_scalars(download(trainer.logger.log_dir, tmp_path))["val_loss"]] == [
        4,
        8,
    ]


def test_fit_without_logger_writes_nothing(tmp_path):
    trainer = fit_tiny(logger=False, default_root_dir=tmp_path)
    assert trainer.loggers == [] and os.listdir(tmp_path) == []


def test_trainer_rejects_bad_logger():
    with pytest.raises(TypeError, match="`logger`"):
        Trainer(max_epochs=1, logger="tensorboard")


class WithHparams(TinyModule):
    def __init__(self, lr: float = 0.1, width: int = 4) -> None:
        super().__init__(lr=lr)
        self.save_hyperparameters()


def test_hyperparameters_reach_the_loggers(make_trainer, make_loader, tmp_path):
    logger = CSVLogger(tmp_path / "logs")
    make_trainer(max_epochs=1, logger=logger).fit(WithHparams(lr=0.05), make_loader())
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f) == {"lr": 0.05, "width": 4}
