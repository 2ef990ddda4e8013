"""Loggers: TensorBoard event files and CSV read back, local and memory://, versions, ranks, logger=."""

from __future__ import annotations

import csv
import io
import os
import uuid

import fsspec
import pytest
import torch
import yaml
from conftest import TinyModule
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


@pytest.fixture
def memory_url():
    root = f"memory://kiln-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root[len("memory://") :]
    if fs.exists(path):
        fs.rm(path, recursive=True)


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


def test_tensorboard_scalars_read_back(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"loss": torch.tensor(0.5), "acc": 0.25}, step=0)
    logger.log_metrics({"loss": 0.25}, step=10)
    logger.save()
    assert logger.log_dir == os.path.join(tmp_path, "lightning_logs", "version_0")
    scalars = read_scalars(logger.log_dir)
    assert scalars["loss"] == [(0, 0.5), (10, 0.25)]
    assert scalars["acc"] == [(0, 0.25)]
    logger.finalize("success")


def test_tensorboard_hparams(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="exp")
    logger.log_hyperparams({"lr": 0.1, "opt": {"name": "sgd", "betas": (0.9, 0.99)}})
    logger.finalize("success")
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f) == {"lr": 0.1, "opt": {"name": "sgd", "betas": [0.9, 0.99]}}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == 0.1
    assert hparams["opt/name"].string_value == "sgd"
    assert hparams["opt/betas"].string_value == "(0.9, 0.99)"


def test_tensorboard_default_hp_metric(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_hyperparams({"lr": 0.1}, metrics={"hp_metric": 0.5})
    logger.finalize("success")
    assert read_scalars(logger.log_dir)["hp_metric"] == [(0, -1.0), (0, 0.5)]
    quiet = TensorBoardLogger(tmp_path, default_hp_metric=False)
    quiet.log_hyperparams({"lr": 0.1})
    quiet.finalize("success")
    assert "hp_metric" not in read_scalars(quiet.log_dir)
    with open(os.path.join(quiet.log_dir, "hparams.yaml")) as f:
        assert yaml.safe_load(f) == {"lr": 0.1}


@pytest.mark.parametrize("logger_cls", [TensorBoardLogger, CSVLogger])
def test_prefix(tmp_path, logger_cls):
    logger = logger_cls(tmp_path, prefix="run")
    logger.log_metrics({"loss": 1.0}, step=3)
    logger.finalize("success")
    if logger_cls is CSVLogger:
        assert read_csv(open(logger.experiment.metrics_file_path).read()) == [{"step": "3", "run-loss": "1.0"}]
    else:
        assert read_scalars(logger.log_dir) == {"run-loss": [(3, 1.0)]}


def test_tensorboard_sub_dir_and_experiment(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    logger = TensorBoardLogger(tmp_path, name="n", version="v", sub_dir="fold_1", flush_secs=1)
    assert logger.log_dir == os.path.join(tmp_path, "n", "v", "fold_1")
    assert logger.root_dir == os.path.join(tmp_path, "n")
    writer = logger.experiment
    assert isinstance(writer, SummaryWriter) and writer.log_dir == logger.log_dir
    writer.add_scalar("direct", 2.0, 7)  # the real writer, as in Lightning
    logger.finalize("success")
    assert read_scalars(logger.log_dir) == {"direct": [(7, 2.0)]}


def test_tensorboard_log_graph(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
    model.example_input_array = torch.zeros(1, 3)
    logger = TensorBoardLogger(tmp_path, log_graph=True)
    logger.log_graph(model)
    logger.finalize("success")
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert acc.Tags()["graph"]
    off = TensorBoardLogger(tmp_path)  # log_graph=False: nothing traced
    off.log_graph(model)
    assert off._experiment is None
    with pytest.warns(UserWarning, match="example_input_array"):
        TensorBoardLogger(tmp_path, log_graph=True).log_graph(torch.nn.Linear(3, 2))


def test_csv_experiment_writer(tmp_path):
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=10)
    logger.log_metrics({"a": 1.0}, step=0)
    writer = logger.experiment
    assert writer.metrics == [{"a": 1.0, "step": 0}]
    assert writer.metrics_file_path == os.path.join(logger.log_dir, "metrics.csv")
    logger.save()
    assert writer.metrics == [] and os.path.exists(writer.metrics_file_path)


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


def test_tensorboard_reopens_after_finalize(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"a": 1.0}, step=1)
    logger.finalize("success")
    logger.log_metrics({"a": 2.0}, step=2)  # e.g. trainer.test after fit with the same logger
    logger.finalize("success")
    assert sorted(read_scalars(logger.log_dir)["a"]) == [(1, 1.0), (2, 2.0)]


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


def test_tensorboard_on_memory_url(memory_url, tmp_path):
    logger = TensorBoardLogger(memory_url)
    for step in range(3):
        logger.log_metrics({"loss": 1.0 / 2**step}, step=step)
    logger.save()
    assert read_scalars(download(logger.log_dir, tmp_path / "a"))["loss"] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    logger.log_metrics({"loss": 0.125}, step=3)
    logger.finalize("success")
    assert read_scalars(download(logger.log_dir, tmp_path / "b"))["loss"][-1] == (3, 0.125)
    assert TensorBoardLogger(memory_url).version == 1


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
