"""State trees <-> (tensors, JSON skeleton): exact round trips, ties, refusals (framework/checkpoint/serialization.py)."""

from __future__ import annotations

import enum
import math
import random
from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from framework.checkpoint.serialization import (
    TAG,
    flatten_state,
    skeleton_from_json,
    skeleton_to_json,
    unflatten_state,
)


def roundtrip(tree):
    tensors, skeleton = flatten_state(tree)
    return unflatten_state(skeleton_from_json(skeleton_to_json(skeleton)), tensors), tensors


def assert_same(a, b):
    """Equal values *and* identical types all the way down (tuple stays tuple, int stays int)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    else:
        assert a == b


@pytest.mark.parametrize("value", [
    None, True, 0, -(2**100), 1.5, -0.0, float("inf"), float("-inf"), float("nan"), "", "ü✓", b"\x00\xff",
    (1, (2, 3), []), [1, [2, (3,)]], {"a": {"b": [1]}}, {1: "a", -2: "b"}, {(1, "x"): 1, None: 2, 2.5: 3, True: 4},
    {TAG: "tensor", "key": "spoof"}, {b"k": 1}, torch.Size([2, 3]), torch.bfloat16, torch.device("cpu"),
    np.float32(1.25), np.int64(-7), np.bool_(True), np.complex64(1 + 2j), np.float16(np.nan),
    np.arange(6, dtype=np.uint32).reshape(2, 3), np.arange(4, dtype=">i4"), np.array(3.5), np.zeros((0, 2)),
    np.array([True, False]), np.arange(6.0)[::2],
])
def test_roundtrip_exact(value):
    out, _ = roundtrip({"v": value})
    assert_same({"v": value}, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
                                   torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
                                   torch.complex64, torch.float8_e4m3fn, torch.uint32])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 1)])
def test_tensor_dtypes_and_shapes(dtype, shape):
    t = (torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) % 3).to(dtype)
    out, _ = roundtrip({"t": t, "nc": t.mT if t.dim() >= 2 else t})
    assert_same(out["t"], t)


def test_python_numpy_torch_rng_states_roundtrip_and_are_accepted():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    gen = np.random.default_rng(4)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": gen.bit_generator.state}
    expected = (random.random(), np.random.rand(), torch.rand(1), gen.random())
    out, _ = roundtrip(state)
    assert_same(state["python"], out["python"])  # a tuple of (int, tuple, None)
    random.setstate(out["python"])
    np.random.set_state(out["numpy"])
    torch.set_rng_state(out["torch"])
    gen.bit_generator.state = out["generator"]
    assert (random.random(), np.random.rand(), torch.rand(1), gen.random()) == expected


def test_optimizer_state_dict_roundtrips_into_load_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    for _ in range(3):
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        sched.step()
    out, _ = roundtrip({"opt": opt.state_dict(), "sched": sched.state_dict()})
    assert set(out["opt"]["state"]) == {0, 1, 2, 3}  # int keys survive
    assert out["opt"]["param_groups"][0]["betas"] == opt.param_groups[0]["betas"]  # a tuple, cycled by OneCycleLR
    assert_same(opt.state_dict(), out["opt"])
    opt2 = torch.optim.Adam(model.parameters(), lr=0.01)
    opt2.load_state_dict(out["opt"])
    sched.load_state_dict(out["sched"])


def test_module_state_dict_keeps_keys_ordereddict_and_version_metadata():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    sd = model.state_dict()
    out, tensors = roundtrip(sd)
    assert type(out) is OrderedDict and out._metadata == sd._metadata
    assert set(tensors) == set(sd)  # a flat state dict's keys are the tensor names


def test_tied_tensors_stored_once_and_restored_as_one_object():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3)})
    model["b"].weight = model["a"].weight
    sd = model.state_dict()
    assert sd["a.weight"] is not sd["b.weight"]  # two detached views of one Parameter
    out, tensors = roundtrip({"model": sd, "again": [sd["a.weight"]]})
    assert "model.b.weight" not in tensors and "model.a.weight" in tensors
    assert out["model"]["a.weight"] is out["model"]["b.weight"] is out["again"][0]


def test_overlapping_but_different_views_are_stored_separately():
    base = torch.arange(6.0)
    out, tensors = roundtrip({"whole": base, "part": base[2:4], "empty1": torch.empty(0), "empty2": torch.empty(0)})
    assert len(tensors) == 4
    assert_same(out["part"], base[2:4].clone())
    assert out["empty1"] is not out["empty2"]


def test_same_numpy_array_twice_comes_back_as_one_array():
    arr = np.arange(3.0)
    out, _ = roundtrip([arr, arr])
    assert out[0] is out[1]


Point = namedtuple("Point", "x y")


class Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(("tree", "where"), [
    ({"a": [1, object()]}, "state['a'][1]"),
    ({"s": {1, 2}}, "state['s']"),
    ({"p": Point(1, 2)}, "state['p']"),
    ({"e": (Color.RED,)}, "state['e'][0]"),
    ({"f": lambda: 0}, "state['f']"),
    ({"o": np.array([object()])}, "state['o']"),
    ({"sp": torch.eye(2).to_sparse()}, "state['sp']"),
    ({"m": torch.empty(2, device="meta")}, "state['m']"),
    ({1: {(1, frozenset()): 3}}, "state[1]"),
])
def test_unsupported_objects_raise_typeerror_naming_the_key_path(tree, where):
    with pytest.raises(TypeError, match="cannot serialize") as info:
        flatten_state(tree)
    assert where in str(info.value)


@pytest.mark.parametrize("skeleton", [
    {TAG: "nonsense"},
    {TAG: "tensor", "key": "missing"},
    {TAG: "ndarray", "key": "t", "dtype": "|O", "shape": [1]},  # object arrays from bytes = forged pointers
    {TAG: "npscalar", "dtype": "|O", "hex": "00" * 8},
    {TAG: "dtype", "name": "manual_seed"},
    {TAG: "tuple", "items": "abc"},
    {TAG: "dict", "items": [[1]]},
    {"x": object},
])
def test_malformed_skeletons_raise_valueerror(skeleton):
    with pytest.raises(ValueError, match="malformed"):
        unflatten_state(skeleton, {"t": torch.zeros(8, dtype=torch.uint8)})


def test_skeleton_json_rejects_foreign_and_newer_documents():
    with pytest.raises(ValueError, match="not a Kiln"):
        skeleton_from_json(b'{"tree": 1}')
    with pytest.raises(ValueError, match="newer"):
        skeleton_from_json(b'{"format": "kiln-tree", "version": 99, "tree": 1}')


_arrays = hnp.arrays(st.sampled_from([np.float32, np.int64, np.bool_, np.uint8, np.float16]),
                     hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4), st.binary(max_size=4),
    _arrays, _arrays.map(lambda a: torch.from_numpy(a.copy())),
)
_keys = st.one_of(st.text(max_size=4), st.integers(), st.tuples(st.integers(), st.text(max_size=2)), st.none())
_trees = st.recursive(_leaves, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.lists(kids, max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=4), kids, max_size=3), st.dictionaries(_keys, kids, max_size=3),
), max_leaves=15)


@settings(max_examples=150, deadline=None)
@given(_trees)
def test_property_flatten_unflatten_is_identity(tree):
    out, _ = roundtrip(tree)
    assert_same(tree, out)
