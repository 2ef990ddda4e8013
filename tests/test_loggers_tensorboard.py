"""TensorBoardLogger (framework/loggers/tensorboard.py): event files read back, hparams, hp_metric, sub_dir,
log_graph, reopening after finalize, memory:// log dirs."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from logger_files import download, read_scalars

from framework.loggers import TensorBoardLogger


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


def test_tensorboard_reopens_after_finalize(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"a": 1.0}, step=1)
    logger.finalize("success")
    logger.log_metrics({"a": 2.0}, step=2)  # e.g. trainer.test after fit with the same logger
    logger.finalize("success")
    assert sorted(read_scalars(logger.log_dir)["a"]) == [(1, 1.0), (2, 2.0)]


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


def test_training_logs_without_waking_a_writer_thread(tmp_path, tiny_module_cls, make_loader):
    """Kiln's own records are written on the training thread; a SummaryWriter (and its thread) exists only once
    user code asks for ``logger.experiment``, and what both write reads back as one run."""
    import threading

    from framework import Callback, Trainer

    seen_threads: set[str] = set()

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen_threads.update(type(t).__name__ for t in threading.enumerate())

    class Module(tiny_module_cls):
        def on_train_end(self):
            self.logger.experiment.add_scalar("from_user", 3.0, 7)

    logger = TensorBoardLogger(tmp_path)
    trainer = Trainer(max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[Watch()],
                      enable_progress_bar=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    module = Module()
    module.save_hyperparameters({"lr": 0.1})
    trainer.fit(module, make_loader())
    assert "_AsyncWriterThread" not in seen_threads
    scalars = read_scalars(logger.log_dir)
    assert [step for step, _ in scalars["train_loss"]] == list(range(1, 11))
    assert scalars["from_user"] == [(7, 3.0)]
    assert len([f for f in os.listdir(logger.log_dir) if "tfevents" in f]) == 2


def test_purge_step_drops_the_interrupted_runs_later_events(tmp_path):
    """SummaryWriter's purge_step applies to Kiln's own event file too: a resumed run logging again from step 5
    replaces what the interrupted run had written from step 5 on."""
    first = TensorBoardLogger(tmp_path, version=0)
    for step in range(8):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finalize("failed")
    resumed = TensorBoardLogger(tmp_path, version=0, purge_step=5)
    for step in range(5, 7):
        resumed.log_metrics({"loss": 10.0 + step}, step=step)
    resumed.finalize("success")
    assert read_scalars(resumed.log_dir)["loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0),
                                                     (6, 16.0)]


def test_unknown_summary_writer_arguments_are_refused_at_construction(tmp_path):
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['flush_sec'\].*flush_secs"):
        TensorBoardLogger(tmp_path, flush_sec=5)
