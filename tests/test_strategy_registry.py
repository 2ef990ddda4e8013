"""Strategy name registry: resolution of strategy/accelerator/devices/num_nodes and refusals of bad input."""

from __future__ import annotations

import pytest
import torch

from framework import Trainer
from strategies import (
    SingleDeviceStrategy,
    Strategy,
    available_strategies,
    register_strategy,
    resolve_strategy,
)
from strategies.registry import _REGISTRY, resolve_accelerator, resolve_devices

CONTRACT_NAMES = ["auto", "single_device", "ddp", "fsdp", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2",
                  "deepspeed_stage_3", "xla"]


def test_contract_names_are_registered():
    assert set(CONTRACT_NAMES) <= set(available_strategies())


@pytest.mark.parametrize(("name", "stage"), [("deepspeed", 2), ("deepspeed_stage_1", 1), ("deepspeed_stage_2", 2),
                                             ("deepspeed_stage_3", 3)])
def test_deepspeed_aliases_carry_their_stage(name, stage):
    target, defaults = _REGISTRY[name]
    assert target == "strategies.deepspeed:DeepSpeedStrategy" and defaults == {"stage": stage}


@pytest.mark.parametrize(("name", "target", "defaults"), [
    ("ddp_find_unused_parameters_true", "ddp:DDPStrategy", {"find_unused_parameters": True}),
    ("ddp_find_unused_parameters_false", "ddp:DDPStrategy", {"find_unused_parameters": False}),
    ("fsdp_cpu_offload", "fsdp:FSDPStrategy", {"cpu_offload": True}),
    ("deepspeed_stage_2_offload", "deepspeed:DeepSpeedStrategy", {"stage": 2, "offload_optimizer": True}),
    ("deepspeed_stage_3_offload", "deepspeed:DeepSpeedStrategy",
     {"stage": 3, "offload_optimizer": True, "offload_parameters": True}),
])
def test_lightning_preset_names_carry_their_settings(name, target, defaults):
    assert _REGISTRY[name] == (f"strategies.{target}", defaults)
    assert resolve_strategy(name, accelerator="cpu", devices=1).__class__.__name__ == target.split(":")[1]


@pytest.mark.parametrize(("name", "words"), [
    ("ddp_spawn", r"no spawn/fork launcher.*strategy='ddp'.*run_distributed"),
    ("ddp_fork", "no spawn/fork launcher"), ("ddp_notebook", "no spawn/fork launcher"),
    ("ddp_spawn_find_unused_parameters_true", "no spawn/fork launcher"),
    ("deepspeed_stage_3_offload_nvme", "NVMe"), ("xla_debug", "strategy='xla'"),
])
def test_lightning_names_kiln_lacks_are_refused_with_the_kiln_way(name, words):
    with pytest.raises(ValueError, match=rf"strategy={name!r} \(Lightning's\) is not supported\. .*{words}"):
        Trainer(strategy=name, accelerator="cpu", devices=2, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False)


@pytest.mark.parametrize("strategy", ["auto", "single_device"])
def test_cpu_resolves_to_single_device(monkeypatch, strategy):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    resolved = resolve_strategy(strategy, accelerator="cpu", devices=1)
    assert type(resolved) is SingleDeviceStrategy
    assert resolved.root_device == torch.device("cpu") and resolved.world_size == 1


def test_instance_is_used_as_given():
    strategy = SingleDeviceStrategy("cpu")
    assert resolve_strategy(strategy) is strategy
    assert Trainer(strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False).strategy is strategy


@pytest.mark.parametrize(("bad", "hint"), [("dpp", "'ddp'"), ("ddp_spawnn", "'ddp'"), ("fsdp2", "'fsdp'"),
                                           ("deepspeed_stage_4", "'deepspeed'"), ("nonsense", None)])
def test_unknown_strategy_names_the_value_and_choices(bad, hint):
    with pytest.raises(ValueError) as info:
        resolve_strategy(bad, accelerator="cpu")
    message = str(info.value)
    assert f"strategy={bad!r}" in message
    assert "single_device" in message and "ddp" in message  # the valid choices
    assert (f"did you mean {hint}" in message) if hint else ("did you mean" not in message)


def test_trainer_refuses_unknown_strategy():
    with pytest.raises(ValueError, match="strategy='bogus' is not a known strategy"):
        Trainer(strategy="bogus", max_epochs=1, logger=False)


@pytest.mark.parametrize("bad", [3, None, object()])
def test_strategy_of_wrong_type(bad):
    with pytest.raises(TypeError, match="must be a name .* or a strategies.Strategy instance"):
        resolve_strategy(bad, accelerator="cpu")


@pytest.mark.parametrize("bad", ["cuda0", "GPU", "npu"])
def test_unknown_accelerator(bad):
    with pytest.raises(ValueError, match=rf"accelerator={bad!r} is not known; use one of"):
        resolve_strategy("auto", accelerator=bad)


@pytest.mark.parametrize(("given", "expected"), [("cpu", "cpu"), ("gpu", "cuda"), ("tpu", "xla"), ("mps", "mps")])
def test_accelerator_aliases(given, expected):
    assert resolve_accelerator(given) == expected


@pytest.mark.parametrize(("devices", "expected"), [(1, 1), (3, 3), ("2", 2), ([0, 1], 2), ("auto", 1), (-1, 1)])
def test_device_counts_on_cpu(devices, expected):
    assert resolve_devices(devices, "cpu") == expected


@pytest.mark.parametrize(("devices", "error"), [(0, ValueError), (-2, ValueError), ("two", ValueError),
                                                ([], ValueError), (True, TypeError), (1.5, ValueError)])
def test_bad_devices(devices, error):
    with pytest.raises(error, match="devices="):
        resolve_devices(devices, "cpu")


@pytest.mark.parametrize("num_nodes", [0, -1, "2", 1.0])
def test_bad_num_nodes(num_nodes):
    with pytest.raises(ValueError, match=r"num_nodes=.* is not valid; use an int >= 1"):
        resolve_strategy("auto", accelerator="cpu", devices=1, num_nodes=num_nodes)


def test_single_device_refuses_several_devices():
    with pytest.raises(ValueError, match="strategy='single_device' cannot use devices=2.*use strategy='ddp'"):
        resolve_strategy("single_device", accelerator="cpu", devices=2)


class _Custom(Strategy):
    name = "custom"

    def __init__(self, accelerator="cpu", devices=1, num_nodes=1, flavour="plain"):
        super().__init__(accelerator, devices, num_nodes)
        self.flavour = flavour


def test_register_strategy_builds_with_defaults():
    register_strategy("custom_test", f"{__name__}:_Custom", flavour="spicy")
    try:
        assert "custom_test" in available_strategies()
        resolved = resolve_strategy("custom_test", accelerator="cpu", devices=1)
        assert type(resolved) is _Custom and resolved.flavour == "spicy"
    finally:
        _REGISTRY.pop("custom_test")
