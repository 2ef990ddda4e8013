"""DataModule: defaults, from_datasets, the dataloader-hook lookup, checkpoint entries, batch-transfer hooks."""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler, TensorDataset

from framework import DataModule, TrainModule
from framework.batch_transfer import BatchTransfer, move_data_to_device
from framework.datamodule import dataloader_hook, datamodule_checkpoint_entries, restore_datamodule


def dataset(n: int = 6) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32).view(n, 1))


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


def test_defaults_match_lightning():
    dm = DataModule()
    assert dm.trainer is None and dm.prepare_data_per_node is True
    assert dm.allow_zero_length_dataloader_with_multiple_devices is False
    assert dm.prepare_data() is None and dm.setup("fit") is None and dm.teardown("fit") is None
    assert dm.state_dict() == {} and dm.hparams == {}
    with pytest.raises(NotImplementedError, match=r"DataModule.train_dataloader\(\) is not implemented"):
        dm.train_dataloader()


def test_dataloader_hook_sees_class_and_instance_overrides():
    class OnlyTrain(DataModule):
        def train_dataloader(self) -> Any:
            return DataLoader(dataset())

    dm = OnlyTrain()
    assert dataloader_hook(dm, "fit")() is not None
    assert dataloader_hook(dm, "validate") is None and dataloader_hook(dm, "predict") is None
    dm.val_dataloader = lambda: DataLoader(dataset())
    assert dataloader_hook(dm, "validate") is not None
    dm.train_dataloader = None  # disabled on the instance, as Lightning users do with steps
    assert dataloader_hook(dm, "fit") is None
    with pytest.raises(ValueError, match="stage='train'"):
        dataloader_hook(dm, "train")


def test_from_datasets_builds_loaders_and_forwards_known_init_args():
    class Sized(DataModule):
        def __init__(self, batch_size: int = 1, flag: bool = False) -> None:
            super().__init__()
            self.batch_size, self.flag = batch_size, flag

    dm = Sized.from_datasets(dataset(6), val_dataset=[dataset(4), dataset(2)], predict_dataset=Stream(),
                             batch_size=2, flag=True)
    assert dm.batch_size == 2 and dm.flag is True
    train = dm.train_dataloader()
    assert train.batch_size == 2 and isinstance(train.sampler, RandomSampler)
    vals = dm.val_dataloader()
    assert [len(v.dataset) for v in vals] == [4, 2] and isinstance(vals[0].sampler, SequentialSampler)
    assert [b.tolist() for b in dm.predict_dataloader()] == [[0, 1], [2]]
    assert dataloader_hook(dm, "test") is None
    assert str(dm).splitlines() == ["{Train dataloader: size=6}", "{Validation dataloader: 1. size=4 ; 2. size=2}",
                                    "{Test dataloader: None}", "{Predict dataloader: size=NA}"]


def test_from_datasets_passes_everything_to_an_init_with_kwargs():
    class Anything(DataModule):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__()
            self.kwargs = kwargs

    assert Anything.from_datasets(dataset(), num_workers=0, batch_size=3).kwargs == {"batch_size": 3,
                                                                                      "num_workers": 0}


def test_checkpoint_entries_keyed_by_qualname_only_when_state_is_not_empty():
    class Stateful(DataModule):
        def __init__(self) -> None:
            super().__init__()
            self.seen = 0

        def state_dict(self) -> dict[str, Any]:
            return {"seen": self.seen} if self.seen else {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.seen = state_dict["seen"]

    dm = Stateful()
    assert datamodule_checkpoint_entries(dm) == {} and datamodule_checkpoint_entries(None) == {}
    dm.seen = 5
    entries = datamodule_checkpoint_entries(dm)
    key = "test_checkpoint_entries_keyed_by_qualname_only_when_state_is_not_empty.<locals>.Stateful"
    assert entries == {key: {"seen": 5}}
    fresh = Stateful()
    restore_datamodule(fresh, {"other": 1})
    assert fresh.seen == 0
    restore_datamodule(fresh, entries)
    assert fresh.seen == 5


# ---- batch transfer ----------------------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", "x y")


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    label: str


def test_move_data_to_device_keeps_containers():
    batch = {"a": [torch.ones(1), (torch.zeros(1), "s")], "p": Pair(torch.ones(1), 3), "d": Batch(torch.ones(1), "l")}
    moved = move_data_to_device(batch, "meta")
    assert moved["a"][0].is_meta and moved["a"][1][0].is_meta and moved["a"][1][1] == "s"
    assert isinstance(moved["p"], Pair) and moved["p"].x.is_meta and moved["p"].y == 3
    assert isinstance(moved["d"], Batch) and moved["d"].x.is_meta and moved["d"].label == "l"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []


def hooks(owner_cls: type, log: list) -> type:
    class WithHooks(owner_cls):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            log.append((owner_cls.__name__, "before", dataloader_idx))
            return batch * 2

        def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
            log.append((owner_cls.__name__, "transfer", str(device)))
            return batch + 1

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            log.append((owner_cls.__name__, "after", dataloader_idx))
            return batch * 10

    return WithHooks


def test_nothing_overridden_is_inactive():
    assert not BatchTransfer(TrainModule(), DataModule(), torch.device("cpu")).active
    assert not BatchTransfer(TrainModule(), None, torch.device("cpu")).active


def test_hooks_run_in_lightnings_order_from_the_module():
    log: list = []
    transfer = BatchTransfer(hooks(TrainModule, log)(), None, torch.device("cpu"))
    assert transfer.active and transfer(torch.tensor(1), 1).item() == 30
    assert log == [("TrainModule", "before", 1), ("TrainModule", "transfer", "cpu"), ("TrainModule", "after", 1)]


def test_datamodule_hooks_win_with_a_warning_when_both_override():
    log: list = []
    with pytest.warns(UserWarning, match="overridden in both"):
        transfer = BatchTransfer(hooks(TrainModule, log)(), hooks(DataModule, log)(), torch.device("cpu"))
    transfer(torch.tensor(1))
    assert {owner for owner, *_ in log} == {"DataModule"}


def test_module_hooks_run_with_a_warning_when_the_datamodule_does_not_override():
    log: list = []
    with pytest.warns(UserWarning, match="a datamodule was passed that does not override it"):
        BatchTransfer(hooks(TrainModule, log)(), DataModule(), torch.device("cpu"))(torch.tensor(1))
    assert {owner for owner, *_ in log} == {"TrainModule"}


def test_default_move_is_used_when_transfer_is_not_overridden():
    class OnlyAfter(DataModule):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return batch + 100

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transfer = BatchTransfer(TrainModule(), OnlyAfter(), torch.device("meta"),
                                 default_move=lambda b: move_data_to_device(b, "cpu") * 2)
    assert transfer(torch.tensor(1)).item() == 102


def test_a_datamodule_without_val_dataloader_trains_without_validation(tmp_path):
    """Lightning's rule: a dataloader hook the DataModule does not override means no data for that stage."""
    from framework import Trainer
    from framework.testing import BoringModule

    class TrainOnly(DataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 32)), batch_size=4)

    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))
    trainer.fit(BoringModule(), datamodule=TrainOnly())
    assert trainer.global_step == 2 and trainer.num_val_batches == []
