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


def test_capture_does_not_initialise_cuda():
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
