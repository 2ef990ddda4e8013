"""save_hyperparameters / hparams / hparams_initial, the JSON codec, and what loggers and checkpoints get."""

from __future__ import annotations

import json
import math
import pathlib
import warnings
from argparse import Namespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from framework import AttributeDict, DataModule, TrainModule
from framework.hparams import hparams_for_logging
from framework.hparams_codec import TAG, decode_hparams, encode_hparams, hparams_for_checkpoint, unrestorable


class AllArgs(TrainModule):
    def __init__(self, lr: float = 0.1, layers: int = 2, name: str = "net", *, shape: tuple = (1, 28, 28)) -> None:
        super().__init__()
        self.save_hyperparameters()


class Named(TrainModule):
    def __init__(self, a: int, b: str, c: float) -> None:
        super().__init__()
        self.save_hyperparameters("a", "c")


class Ignoring(TrainModule):
    def __init__(self, backbone: torch.nn.Module | None = None, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone or torch.nn.Linear(2, 2)


class FromConfig(TrainModule):
    def __init__(self, config: dict | Namespace) -> None:
        super().__init__()
        self.save_hyperparameters(config)


class Parent(TrainModule):
    def __init__(self, width: int = 4, depth: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()


class Child(Parent):
    def __init__(self, width: int = 8, dropout: float = 0.5, **kwargs) -> None:
        super().__init__(width=width, **kwargs)


class Kwargs(TrainModule):
    def __init__(self, lr: float = 0.1, *args, **kwargs) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_all_init_args_in_order_with_attribute_access():
    module = AllArgs(lr=0.5, name="x")
    assert module.hparams == {"lr": 0.5, "layers": 2, "name": "x", "shape": (1, 28, 28)}
    assert module.hparams.lr == 0.5 and module.hparams["layers"] == 2
    assert isinstance(module.hparams, AttributeDict)
    assert module._hparams_name == "kwargs"


def test_named_arguments_only():
    assert Named(1, "b", 3.0).hparams == {"a": 1, "c": 3.0}


def test_ignore_accepts_a_name_or_a_list():
    assert Ignoring(torch.nn.Linear(2, 2), lr=0.2).hparams == {"lr": 0.2}

    class One(TrainModule):
        def __init__(self, a: int = 1, b: int = 2) -> None:
            super().__init__()
            self.save_hyperparameters(ignore="a")

    assert One().hparams == {"b": 2}


@pytest.mark.parametrize("config", [{"lr": 0.1, "depth": 3}, Namespace(lr=0.1, depth=3)])
def test_dict_or_namespace_becomes_the_hparams_and_records_its_argument_name(config):
    module = FromConfig(config)
    assert module.hparams == {"lr": 0.1, "depth": 3}
    assert module._hparams_name == "config"


def test_inheritance_chain_most_derived_class_wins_and_kwargs_are_flattened():
    assert Child(depth=3).hparams == {"width": 8, "depth": 3, "dropout": 0.5}
    assert Kwargs(0.2, 7, extra="x").hparams == {"lr": 0.2, "extra": "x"}


def test_hparams_initial_is_a_frozen_copy():
    module = AllArgs()
    module.hparams.lr = 9.0
    module.hparams_initial["lr"] = 7.0
    assert module.hparams.lr == 9.0 and module.hparams_initial.lr == 0.1


def test_empty_container_records_nothing_and_hparams_default_empty():
    class Empty(TrainModule):
        def __init__(self, a: int = 1) -> None:
            super().__init__()
            self.save_hyperparameters({})

    module = Empty()
    assert module.hparams == {} and module.hparams_initial == {}


@pytest.mark.parametrize("args, message", [(("nope",), "not an argument"), ((3,), "single int"),
                                           (([1, 2],), "got a list"), (("a", "b"), "also in ignore=")])
def test_bad_arguments_are_clear_errors(args, message):
    class Bad(TrainModule):
        def __init__(self, a: int = 1, b: int = 2) -> None:
            super().__init__()
            self.save_hyperparameters(*args, ignore=["b"])

    with pytest.raises(ValueError, match=message):
        Bad()


def test_module_argument_warns_and_recommends_ignore():
    class WithBackbone(TrainModule):
        def __init__(self, backbone: torch.nn.Module) -> None:
            super().__init__()
            self.save_hyperparameters()

    with pytest.warns(UserWarning, match=r"ignore=\['backbone'\]"):
        WithBackbone(torch.nn.Linear(1, 1))


def test_datamodule_has_the_same_mixin():
    class DM(DataModule):
        def __init__(self, batch_size: int = 32, root: str = "/data") -> None:
            super().__init__()
            self.save_hyperparameters(logger=False)

    dm = DM(batch_size=8)
    assert dm.hparams == {"batch_size": 8, "root": "/data"}
    assert dm._log_hyperparams is False


def test_attribute_dict_repr_and_missing_attribute():
    hp = AttributeDict(name="abc", lr=0.1)
    assert repr(hp).splitlines() == ['"lr":   0.1', '"name": abc']  # sorted, as Lightning prints them
    with pytest.raises(AttributeError, match="nope"):
        hp.nope  # noqa: B018


# ---- what loggers receive -----------------------------------------------------------------------------------

class DM(DataModule):
    def __init__(self, batch_size: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_logging_merges_module_and_datamodule_and_refuses_conflicts():
    assert hparams_for_logging(AllArgs(lr=0.1), DM()) == {"lr": 0.1, "layers": 2, "name": "net",
                                                          "shape": (1, 28, 28), "batch_size": 4}
    with pytest.raises(RuntimeError, match=r"\['lr'\]"):
        hparams_for_logging(AllArgs(lr=0.5), DM())
    assert hparams_for_logging(TrainModule(), None) is None
    quiet = AllArgs()
    quiet._log_hyperparams = False
    assert hparams_for_logging(quiet, DM()) == {"batch_size": 4, "lr": 0.1}


# ---- JSON codec ---------------------------------------------------------------------------------------------

def test_exact_values_round_trip_through_plain_json():
    hp = {"f": 0.25, "i": 3, "s": "x", "n": None, "b": True, "l": [1, [2, "a"]], "t": (1, (2, 3)),
          "d": {"k": {"z": 1}}, "intkeys": {1: "a", 2: "b"}, "inf": math.inf, "path": pathlib.Path("/a/b"),
          "dtype": torch.bfloat16, "device": torch.device("cpu"), "ns": Namespace(a=1)}
    stored = json.loads(json.dumps(encode_hparams(hp), allow_nan=False))  # pure, strict JSON
    back = decode_hparams(stored)
    expected = {**hp, "ns": {"a": 1}}
    assert back == expected
    assert type(back["t"]) is tuple and type(back["t"][1]) is tuple and back["d"].k.z == 1


def test_numpy_scalars_become_numbers():
    np = pytest.importorskip("numpy")
    assert decode_hparams(encode_hparams({"a": np.float32(0.5), "b": np.int64(3)})) == {"a": 0.5, "b": 3}


def test_a_value_json_cannot_hold_is_stored_by_repr_with_a_warning_naming_it():
    with pytest.warns(UserWarning, match=r"'loss_fn' of Owner is a .*MSELoss.*load_from_checkpoint"):
        stored = encode_hparams({"loss_fn": torch.nn.MSELoss(), "lr": 0.1}, "Owner")
    json.dumps(stored)
    back = decode_hparams(stored)
    assert unrestorable(back["loss_fn"]) and back["loss_fn"]["repr"] == "MSELoss()"
    assert back["lr"] == 0.1


def test_unknown_tag_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tag"):
        decode_hparams({"x": {TAG: "pickle", "data": "..."}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=10)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=5), json_values, max_size=4))
def test_codec_round_trips_every_json_tree_with_tuples(hp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here needs a repr
        stored = encode_hparams(hp)
    assert decode_hparams(json.loads(json.dumps(stored))) == hp


def test_checkpoint_entries_use_lightnings_keys_only_for_objects_with_hparams():
    entries = hparams_for_checkpoint(AllArgs(), DM())
    assert entries == {"hparams_name": "kwargs",
                       "hyper_parameters": {"lr": 0.1, "layers": 2, "name": "net",
                                            "shape": {TAG: "tuple", "items": [1, 28, 28]}},
                       "datamodule_hparams_name": "kwargs",
                       "datamodule_hyper_parameters": {"batch_size": 4, "lr": 0.1}}
    assert hparams_for_checkpoint(TrainModule(), None) == {}
