"""MLFlowLogger against real local MLflow stores (SQLite and file), read back through mlflow's client."""

from __future__ import annotations

import filecmp
import os
import types
import uuid

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from framework import Trainer, TrainModule
from framework.loggers import MLFlowLogger

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/store.db"


def client(uri):
    return mlflow.tracking.MlflowClient(uri)


def history(uri, run_id, key):
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def test_metrics_params_tags_and_status_read_back(sqlite_uri, tmp_path):
    name = f"exp-{uuid.uuid4().hex[:8]}"
    logger = MLFlowLogger(experiment_name=name, run_name="first", tracking_uri=sqlite_uri, tags={"team": "kiln"},
                          artifact_location=str(tmp_path / "art"), prefix="p")
    logger.log_hyperparams({"lr": 0.1, "opt": {"name": "adam", "betas": (0.9, 0.99)}})
    logger.log_metrics({"loss": torch.tensor(0.5)}, step=1)
    logger.log_metrics({"loss": 0.25}, step=2)
    logger.finalize("success")
    run = client(sqlite_uri).get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first" and run.data.tags["team"] == "kiln"
    assert run.data.params == {"lr": "0.1", "opt/name": "adam", "opt/betas": "(0.9, 0.99)"}
    assert history(sqlite_uri, logger.run_id, "p-loss") == [(1, 0.5), (2, 0.25)]
    assert client(sqlite_uri).get_experiment_by_name(name).experiment_id == logger.experiment_id == logger.name
    assert logger.version == logger.run_id


def test_resume_existing_run_and_failed_status(sqlite_uri):
    first = MLFlowLogger(experiment_name="resume", tracking_uri=sqlite_uri)
    first.log_metrics({"a": 1.0}, step=0)
    first.finalize("success")
    again = MLFlowLogger(tracking_uri=sqlite_uri, run_id=first.run_id)
    again.log_metrics({"a": 2.0}, step=1)
    again.finalize("failed")
    assert again.experiment_id == first.experiment_id
    assert history(sqlite_uri, first.run_id, "a") == [(0, 1.0), (1, 2.0)]
    assert client(sqlite_uri).get_run(first.run_id).info.status == "FAILED"


def test_file_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores otherwise
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(tracking_uri=uri)
    logger.log_metrics({"x": 3.0}, step=4)
    logger.finalize("success")
    assert logger.save_dir == str(tmp_path / "mlruns")
    assert history(uri, logger.run_id, "x") == [(4, 3.0)]


def test_default_store_is_sqlite_under_save_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = MLFlowLogger(save_dir=str(tmp_path / "runs"))
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    uri = f"sqlite:///{tmp_path / 'runs'}/mlflow.db"
    assert history(uri, logger.run_id, "x") == [(0, 1.0)]
    run = client(uri).get_run(logger.run_id)
    assert str(tmp_path / "runs" / "artifacts") in run.info.artifact_uri


@pytest.mark.parametrize("log_model", ["all", True])
def test_log_model_uploads_checkpoint_directories(sqlite_uri, tmp_path, log_model):
    ckpt = tmp_path / f"epoch=0-step=4-{log_model}"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    callback = types.SimpleNamespace(save_top_k=1, best_k_models={str(ckpt): 0.5}, best_model_path=str(ckpt),
                                     last_model_path="")
    logger = MLFlowLogger(experiment_name="models", tracking_uri=sqlite_uri, log_model=log_model,
                          artifact_location=str(tmp_path / "art"), checkpoint_path_prefix="ckpt/")
    logger.after_save_checkpoint(callback)
    listed = lambda: [f.path for f in client(sqlite_uri).list_artifacts(logger.run_id, f"ckpt/{ckpt.name}")]  # noqa: E731
    assert listed() == ([f"ckpt/{ckpt.name}/model.safetensors"] if log_model == "all" else [])
    logger.finalize("success")
    assert listed() == [f"ckpt/{ckpt.name}/model.safetensors"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="log_model"):
        MLFlowLogger(log_model="best")
    with pytest.raises(TypeError, match="tags"):
        MLFlowLogger(tags=["a"])


class Tiny(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_logs_to_mlflow(sqlite_uri, tmp_path):
    logger = MLFlowLogger(experiment_name="fit", tracking_uri=sqlite_uri, artifact_location=str(tmp_path / "a"))
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    trainer = Trainer(max_epochs=1, log_every_n_steps=1, logger=logger, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))
    steps = [step for step, _ in history(sqlite_uri, logger.run_id, "train_loss")]
    assert steps == [1, 2, 3, 4]
    assert client(sqlite_uri).get_run(logger.run_id).info.status == "FINISHED"
    assert not os.path.exists(tmp_path / "mlruns")


@pytest.mark.parametrize("log_model", ["all", True])
def test_fit_uploads_model_checkpoints(sqlite_uri, tmp_path, log_model):
    from callbacks import ModelCheckpoint

    logger = MLFlowLogger(experiment_name=f"ckpt-{log_model}", tracking_uri=sqlite_uri, log_model=log_model,
                          artifact_location=str(tmp_path / "art"))
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpts"), save_top_k=-1)
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    trainer = Trainer(max_epochs=2, logger=logger, callbacks=[checkpoint], enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))
    saved = sorted(os.listdir(tmp_path / "ckpts"))
    assert len(saved) == 2
    uploaded = sorted(f.path for f in client(sqlite_uri).list_artifacts(logger.run_id))
    assert uploaded == saved
    for name in saved:  # every file of each checkpoint directory, byte for byte
        fetched = client(sqlite_uri).download_artifacts(logger.run_id, name, str(tmp_path / "fetched"))
        comparison = filecmp.dircmp(tmp_path / "ckpts" / name, fetched)
        assert comparison.left_list == comparison.right_list and comparison.left_list
        assert filecmp.cmpfiles(tmp_path / "ckpts" / name, fetched, comparison.left_list, shallow=False)[0] == \
            comparison.left_list
