"""load_from_checkpoint: rebuilt from JSON hyperparameters, weights loaded, from directories, URLs, last/best."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest
import torch

from framework import DataModule, Trainer, TrainModule
from framework.checkpoint import MODEL, TRAINER, CheckpointError, save_checkpoint
from framework.datamodule import datamodule_checkpoint_entries
from framework.hparams_codec import hparams_for_checkpoint


class Net(TrainModule):
    def __init__(self, hidden: int = 3, lr: float = 0.1, shape: tuple = (2, 2), act: str = "relu") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, hidden)
        self.loaded_checkpoint: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_checkpoint = checkpoint


class Data(DataModule):
    def __init__(self, batch_size: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = state_dict["position"]


def write(path: str, module: TrainModule, datamodule: DataModule | None = None, step: int = 0,
          extra: dict[str, Any] | None = None) -> str:
    """A checkpoint as the Trainer writes it: model weights + a trainer state carrying the hyperparameters."""
    trainer_state = {**hparams_for_checkpoint(module, datamodule), **datamodule_checkpoint_entries(datamodule),
                     **(extra or {})}
    save_checkpoint(path, {MODEL: module.state_dict(), TRAINER: trainer_state}, {"epoch": 0, "global_step": step})
    return path


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_round_trip_rebuilds_from_hparams_and_loads_weights(tmp_path):
    net = Net(hidden=5, lr=0.3, shape=(1, 28))
    path = write(str(tmp_path / "ckpt"), net, step=7)
    loaded = Net.load_from_checkpoint(path)
    assert loaded.hparams == {"hidden": 5, "lr": 0.3, "shape": (1, 28), "act": "relu"}
    assert type(loaded.hparams.shape) is tuple and loaded.layer.out_features == 5
    assert same_weights(net, loaded)
    checkpoint = loaded.loaded_checkpoint
    assert checkpoint["hyper_parameters"]["lr"] == 0.3 and checkpoint["global_step"] == 7
    assert set(checkpoint["state_dict"]) == {"layer.weight", "layer.bias"}


def test_hparams_are_stored_as_plain_json_without_pickle(tmp_path):
    path = write(str(tmp_path / "ckpt"), Net(hidden=5))
    files = sorted(os.listdir(path))
    assert not any(f.endswith((".pt", ".pkl")) for f in files)
    text = "".join((tmp_path / "ckpt" / f).read_text() for f in files if f.endswith(".json"))
    assert '"hyper_parameters":{"hidden":5,"lr":0.1,"shape":{"__hparam__":"tuple","items":[2,2]}' in text


def test_overrides_win_and_unknown_names_are_dropped(tmp_path):
    path = write(str(tmp_path / "ckpt"), Net(hidden=5))
    loaded = Net.load_from_checkpoint(path, lr=0.01, not_an_arg=1)
    assert loaded.hparams.lr == 0.01 and loaded.hparams.hidden == 5


def test_memory_url_and_last_and_best_resolution():
    root = f"memory://kiln-{uuid.uuid4().hex}"
    old, new = Net(hidden=2), Net(hidden=3)
    write(f"{root}/epoch=0", old, step=1)
    callbacks = {"ModelCheckpoint{}": {"best_model_path": f"/somewhere/else/{'epoch=0'}", "dirpath": "/x"}}
    write(f"{root}/epoch=1", new, step=2, extra={"callbacks": callbacks})
    assert same_weights(Net.load_from_checkpoint(f"{root}/epoch=1"), new)
    assert Net.load_from_checkpoint(f"{root}/last").layer.out_features == 3
    # "best" stays inside dirpath: only the recorded name is used, never the recorded directory
    assert same_weights(Net.load_from_checkpoint(f"{root}/best"), old)
    with pytest.raises(CheckpointError, match="directory of checkpoints"):
        Net.load_from_checkpoint(root)


def test_last_with_no_checkpoint_and_best_without_a_record_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Net.load_from_checkpoint(str(tmp_path / "last"))
    write(str(tmp_path / "a"), Net())
    with pytest.raises(CheckpointError, match="no ModelCheckpoint"):
        Net.load_from_checkpoint(str(tmp_path / "best"))


def test_value_stored_by_repr_must_be_passed_again(tmp_path):
    class WithLoss(Net):
        def __init__(self, loss_fn: torch.nn.Module | None = None, hidden: int = 3) -> None:
            super().__init__(hidden=hidden)
            self.save_hyperparameters()
            self.loss_fn = loss_fn

    with pytest.warns(UserWarning):
        module = WithLoss(torch.nn.MSELoss(), hidden=4)
        path = write(str(tmp_path / "ckpt"), module)
    with pytest.raises(ValueError, match=r"\['loss_fn'\].*MSELoss.*loss_fn=\.\.\."):
        WithLoss.load_from_checkpoint(path)
    loaded = WithLoss.load_from_checkpoint(path, loss_fn=torch.nn.L1Loss())
    assert isinstance(loaded.loss_fn, torch.nn.L1Loss) and loaded.layer.out_features == 4


def test_dict_argument_comes_back_as_that_argument(tmp_path):
    class Configured(TrainModule):
        def __init__(self, config: dict) -> None:
            super().__init__()
            self.save_hyperparameters(config)
            self.layer = torch.nn.Linear(2, config["width"])

    path = write(str(tmp_path / "ckpt"), Configured({"width": 3, "lr": 0.1}))
    loaded = Configured.load_from_checkpoint(path, lr=0.5)
    assert loaded.hparams == {"width": 3, "lr": 0.5} and loaded.layer.out_features == 3


@pytest.mark.parametrize("suffix, text", [("yaml", "hidden: 5\nlr: 0.2\n"), ("csv", "key,value\nhidden,5\nlr,0.2\n")])
def test_hparams_file_replaces_the_saved_ones(tmp_path, suffix, text):
    path = write(str(tmp_path / "ckpt"), Net(hidden=5, act="tanh"))
    (tmp_path / f"hp.{suffix}").write_text(text)
    loaded = Net.load_from_checkpoint(path, hparams_file=str(tmp_path / f"hp.{suffix}"))
    assert loaded.hparams == {"hidden": 5, "lr": 0.2, "shape": (2, 2), "act": "relu"}  # the file's, defaults


def test_hparams_file_written_by_lightning_keeps_tuples_and_refuses_code(tmp_path):
    path = write(str(tmp_path / "ckpt"), Net(shape=(3, 4)))
    (tmp_path / "hp.yaml").write_text("shape: !!python/tuple\n- 3\n- 4\n")
    assert Net.load_from_checkpoint(path, hparams_file=str(tmp_path / "hp.yaml")).hparams.shape == (3, 4)
    (tmp_path / "evil.yaml").write_text("x: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(Exception, match="python/object/apply"):
        Net.load_from_checkpoint(path, hparams_file=str(tmp_path / "evil.yaml"))


def test_hparams_file_of_another_kind_is_refused(tmp_path):
    path = write(str(tmp_path / "ckpt"), Net())
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.csv"):
        Net.load_from_checkpoint(path, hparams_file=str(tmp_path / "hp.json"))


def test_strict_false_warns_about_mismatched_keys_and_strict_loading_conflict(tmp_path):
    path = write(str(tmp_path / "ckpt"), Net(hidden=5))
    with pytest.raises(RuntimeError, match="size mismatch"):
        Net.load_from_checkpoint(path, hidden=6)

    class Bigger(Net):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.extra = torch.nn.Linear(1, 1)

    with pytest.warns(UserWarning, match="not in the checkpoint: \\['extra.weight', 'extra.bias'\\]"):
        Bigger.load_from_checkpoint(path, strict=False)

    class Lenient(Bigger):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.strict_loading = False

    with pytest.warns(UserWarning, match="not in the checkpoint"):
        Lenient.load_from_checkpoint(path)  # the module's strict_loading=False is the default
    with pytest.raises(ValueError, match="contradicts Lenient.strict_loading=False"):
        Lenient.load_from_checkpoint(path, strict=True)


def test_called_on_an_instance_is_a_type_error(tmp_path):
    path = write(str(tmp_path / "ckpt"), Net())
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        Net().load_from_checkpoint(path)


def test_map_location(tmp_path):
    path = write(str(tmp_path / "ckpt"), Net())
    assert Net.load_from_checkpoint(path, map_location="cpu").device == torch.device("cpu")
    with pytest.raises(TypeError, match="keep no per-tensor device"):
        Net.load_from_checkpoint(path, map_location={"cuda:0": "cpu"})


def test_configure_model_runs_before_weights_load(tmp_path):
    class Lazy(TrainModule):
        def __init__(self, width: int = 3) -> None:
            super().__init__()
            self.save_hyperparameters()

        def configure_model(self) -> None:
            self.layer = torch.nn.Linear(2, self.hparams.width)

    eager = Lazy()
    eager.configure_model()
    loaded = Lazy.load_from_checkpoint(write(str(tmp_path / "ckpt"), eager))
    assert same_weights(eager, loaded) and loaded._kiln_model_configured


def test_datamodule_round_trip_with_state(tmp_path):
    dm = Data(batch_size=8, seed=3)
    dm.position = 42
    path = write(str(tmp_path / "ckpt"), Net(), dm)
    loaded = Data.load_from_checkpoint(path, seed=4)
    assert loaded.hparams == {"batch_size": 8, "seed": 4} and loaded.position == 42
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        dm.load_from_checkpoint(path)


def test_trainer_written_checkpoint_loads(tmp_path):
    """A checkpoint written by trainer.save_checkpoint carries the hyperparameters (as JSON) and rebuilds the module."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    module = Net(hidden=2, lr=0.05)
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    trainer.save_checkpoint(str(tmp_path / "ckpt"))
    loaded = Net.load_from_checkpoint(str(tmp_path / "ckpt"))
    assert loaded.hparams == module.hparams and same_weights(loaded, module)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["metadata"]["global_step"] == 2
