"""DistributedState: shared topology, environment defaults, and the _reset_state() contract (DESIGN.md §2)."""

from __future__ import annotations

import pytest
import torch

from framework import DistributedState

KNOWN = ["num_processes", "process_index", "local_process_index", "device", "backend", "is_main_process",
         "is_local_main_process", "initialized"]


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    DistributedState._reset_state()


def test_defaults_describe_one_cpu_process():
    state = DistributedState()
    assert (state.num_processes, state.process_index, state.local_process_index) == (1, 0, 0)
    assert state.device == torch.device("cpu")
    assert state.backend is None
    assert state.initialized and state.is_main_process and state.is_local_main_process


def test_topology_read_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    state = DistributedState()
    assert (state.num_processes, state.process_index, state.local_process_index) == (4, 3, 1)
    assert not state.is_main_process and not state.is_local_main_process


def test_instances_share_one_state():
    first = DistributedState()
    DistributedState(process_index=1, num_processes=2)
    assert first.process_index == 1 and first.num_processes == 2
    assert not first.is_main_process
    # A plain construction afterwards does not re-read the environment over the shared values.
    assert DistributedState().process_index == 1


@pytest.mark.parametrize("name", KNOWN)
def test_known_attribute_after_reset_explains_how_to_reinitialise(name):
    state = DistributedState()
    getattr(state, name)
    DistributedState._reset_state()
    with pytest.raises(AttributeError) as info:
        getattr(state, name)
    message = str(info.value)
    assert "`DistributedState` object has no attribute" in message
    assert "This happens if `DistributedState._reset_state()`" in message
    assert "DistributedState()" in message  # how to re-initialise


def test_unknown_attribute_gives_ordinary_error_without_hint():
    state = DistributedState()
    with pytest.raises(AttributeError) as info:
        _ = state.someotherthing
    message = str(info.value)
    assert "'DistributedState' object has no attribute 'someotherthing'" in message
    assert "_reset_state()" not in message
    DistributedState._reset_state()
    with pytest.raises(AttributeError) as info:
        _ = state.someotherthing
    assert "_reset_state()" not in str(info.value)


def test_reinitialised_after_reset():
    DistributedState(process_index=5, num_processes=8)
    DistributedState._reset_state()
    state = DistributedState()
    assert state.process_index == 0 and state.num_processes == 1


def test_repr_after_reset_does_not_raise():
    state = DistributedState()
    assert "num_processes=1" in repr(state)
    DistributedState._reset_state()
    assert repr(state) == "DistributedState(<reset>)"


def test_trainer_publishes_topology(make_trainer, tiny_module_cls, make_loader):
    trainer = make_trainer()
    trainer.fit(tiny_module_cls(), make_loader())
    state = DistributedState()
    assert (state.num_processes, state.process_index) == (trainer.world_size, trainer.global_rank) == (1, 0)
    assert state.device == trainer.strategy.root_device
