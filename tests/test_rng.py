"""capture_rng_state / restore_rng_state round trips and checkpoint safety."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from framework.rng import capture_rng_state, restore_rng_state

_LEAVES = (str, int, float, bool, type(None), torch.Tensor)


def _draw() -> list:
    return [
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    ]


def _assert_checkpoint_safe(tree) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            assert isinstance(key, str)
            _assert_checkpoint_safe(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _assert_checkpoint_safe(value)
    else:
        assert isinstance(tree, _LEAVES), type(tree)
        if isinstance(tree, torch.Tensor):
            assert tree.device.type == "cpu"


def test_round_trip_reproduces_every_source():
    torch.manual_seed(0)
    _draw()  # leave a cached gaussian in python random and numpy
    random.gauss(0, 1)
    np.random.standard_normal()
    state = capture_rng_state()
    first = _draw()
    _draw()
    restore_rng_state(state)
    assert _draw() == first


def test_state_is_a_checkpoint_safe_tree():
    state = capture_rng_state()
    _assert_checkpoint_safe(state)
    assert {"python", "numpy", "torch"} <= set(state)


def test_round_trip_through_safe_torch_load(tmp_path):
    state = capture_rng_state()
    expected = _draw()
    torch.save(state, tmp_path / "rng.pt")
    _draw()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draw() == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_round_trip_covers_every_cuda_device():
    for index in range(torch.cuda.device_count()):
        torch.rand(1, device=f"cuda:{index}")
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = [torch.rand(2, device=f"cuda:{i}").tolist() for i in range(torch.cuda.device_count())]
    restore_rng_state(state)
    assert [torch.rand(2, device=f"cuda:{i}").tolist() for i in range(torch.cuda.device_count())] == expected


def test_capture_does_not_initialise_cuda():
    if torch.cuda.is_initialized():
        pytest.skip("CUDA was already initialised by another test")
    capture_rng_state()
    assert not torch.cuda.is_initialized()


def test_missing_backend_is_skipped_with_warning():
    state = capture_rng_state()
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    state["cuda"] = [torch.get_rng_state()]
    expected = _draw()
    with pytest.warns(UserWarning, match="CUDA"):
        restore_rng_state(state)
    assert _draw() == expected


def test_partial_state_restores_only_given_sources():
    state = capture_rng_state()
    expected_torch = torch.rand(2).tolist()
    restore_rng_state({"torch": state["torch"]})
    assert torch.rand(2).tolist() == expected_torch


@pytest.mark.parametrize("bad, error", [([1, 2], TypeError), ({"dice": 4}, ValueError)])
def test_bad_state_is_refused(bad, error):
    with pytest.raises(error, match="capture_rng_state"):
        restore_rng_state(bad)


# ---- RNGCapture callback -----------------------------------------------------------------------
def test_rng_capture_is_per_rank_and_dispatched_at_epoch_start():
    from callbacks.base import CallbackList
    from callbacks.rng import RNGCapture

    callback = RNGCapture()
    assert RNGCapture.per_rank_state is True
    assert CallbackList([callback]).on_train_epoch_start.hooks == (callback.on_train_epoch_start,)


def test_rng_capture_restores_at_the_next_train_epoch_start_only():
    from callbacks.rng import RNGCapture

    saved = RNGCapture().state_dict()  # captured at call time
    _assert_checkpoint_safe(saved)
    expected = _draw()

    resumed = RNGCapture()
    resumed.load_state_dict(saved)
    assert resumed.state_dict() is saved  # a save before the restore keeps the loaded state
    not_yet = _draw()  # loading does not restore by itself
    assert not_yet != expected
    resumed.on_train_epoch_start(None, None)
    assert _draw() == expected
    resumed.on_train_epoch_start(None, None)  # later epochs are left alone
    assert _draw() != expected


def test_rng_capture_refuses_a_non_dict_state():
    from callbacks.rng import RNGCapture

    with pytest.raises(TypeError, match="state_dict"):
        RNGCapture().load_state_dict([1])
