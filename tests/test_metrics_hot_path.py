"""MetricCollector.log remembers resolved options per call site (the per-step hot path): whatever the call
sequence, it records exactly what the full path records, and it still refuses what the full path refuses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.exceptions import MisconfigurationException
from framework.metrics import MetricCollector


class _Forgetful(dict):
    """A memo that never stores: every call takes the full path."""

    def __setitem__(self, key, value) -> None:
        pass


def _full_path_only() -> MetricCollector:
    collector = MetricCollector()
    collector._known = _Forgetful()
    return collector


def _value(kind: str, x: float, leaf: torch.Tensor) -> object:
    if kind == "graph":
        return (leaf * x).sum()
    if kind == "leaf":  # logged as is, then changed in place: the step value must be the logged one
        return leaf
    if kind == "float64":
        return torch.tensor(x, dtype=torch.float64)
    if kind == "int":
        return torch.tensor(int(x * 10))
    if kind == "shape1":
        return torch.tensor([x])
    return x  # a plain number


calls = st.tuples(
    st.sampled_from(["a", "b"]),  # name
    st.sampled_from(["graph", "leaf", "float64", "int", "shape1", "number"]),
    st.sampled_from([(None, None), (True, True), (False, True), (True, False)]),  # on_step, on_epoch
    st.sampled_from(["mean", "sum", "max"]),
    st.sampled_from([None, 3]),  # batch_size
    st.booleans(),  # prog_bar
)


def _snapshot(collector: MetricCollector) -> dict:
    return {k: v.clone() for k, v in collector.callback_metrics().items()} | {
        "steps/" + k: v.clone() for k, v in collector.step_values.items()}


@settings(max_examples=60, deadline=None)
@given(sites=st.lists(calls, min_size=1, max_size=4),
       values=st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=2, max_size=6))
def test_remembered_options_record_what_the_full_path_records(sites, values):
    """Every call site logs once per batch (a new value, a new batch size), as a training_step does."""
    fast, full = MetricCollector(), _full_path_only()
    leaf_fast, leaf_full = torch.ones(()), torch.ones(())
    outcomes = []
    for collector, leaf in ((fast, leaf_fast), (full, leaf_full)):
        seen, errors = [], []
        collector.start_stage("train")
        for i, x in enumerate(values):
            collector.on_batch_start(torch.zeros(i + 2, 3))
            collector.current_fx = "training_step"
            for name, kind, (on_step, on_epoch), reduce_fx, batch_size, prog_bar in sites:
                try:
                    collector.log(f"{name}_{kind}", _value(kind, x, leaf), prog_bar=prog_bar, on_step=on_step,
                                  on_epoch=on_epoch, reduce_fx=reduce_fx, batch_size=batch_size)
                except MisconfigurationException as error:
                    errors.append(str(error))
                leaf.add_(1.0)  # in place, after logging
            collector.current_fx = None
            collector.on_batch_end()
            seen.append(_snapshot(collector))
        collector.epoch_end_reached()
        seen.append({k: v.clone() for k, v in collector.reduce_epoch().items()})
        collector.end_stage()
        seen.append(_snapshot(collector))
        outcomes.append((seen, errors))
    (fast_seen, fast_errors), (full_seen, full_errors) = outcomes
    assert fast_errors == full_errors
    assert len(fast_seen) == len(full_seen)
    for got, want in zip(fast_seen, full_seen):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            assert torch.equal(got[key], want[key]), key


def test_a_repeated_call_with_other_options_is_still_refused():
    collector = MetricCollector()
    collector.start_stage("train")
    collector.on_batch_start(torch.zeros(2, 3))
    collector.current_fx = "training_step"
    for _ in range(2):  # the second call takes the remembered path
        collector.log("loss", torch.tensor(1.0), on_step=True)
    with pytest.raises(MisconfigurationException, match="different options"):
        collector.log("loss", torch.tensor(1.0), on_step=True, prog_bar=True)


def test_a_logged_parameter_is_copied_on_every_call():
    collector = MetricCollector()
    collector.start_stage("train")
    collector.current_fx = "training_step"
    weight = torch.nn.Parameter(torch.tensor(1.0))
    for expected in (1.0, 2.0, 3.0):
        collector.on_batch_start(torch.zeros(2, 3))
        collector.log("w", weight, on_step=True)
        with torch.no_grad():
            weight.add_(1.0)  # an optimizer step after logging
        assert float(collector.step_values["w"]) == expected
        collector.on_batch_end()


def test_remembered_options_follow_a_restored_state():
    collector = MetricCollector()
    collector.start_stage("train")
    collector.current_fx = "training_step"
    for value in (1.0, 3.0):
        collector.on_batch_start(torch.zeros(2, 3))
        collector.log("m", torch.tensor(value), on_step=False, on_epoch=True)
    state = collector.state_dict()
    restored = MetricCollector()
    restored.start_stage("train")
    restored.current_fx = "training_step"
    restored.on_batch_start(torch.zeros(2, 3))
    restored.log("m", torch.tensor(100.0), on_step=False, on_epoch=True)  # remembered, then replaced by the restore
    restored.load_state_dict(state)
    restored.start_stage("train")
    restored.current_fx = "training_step"
    restored.on_batch_start(torch.zeros(2, 3))
    restored.log("m", torch.tensor(5.0), on_step=False, on_epoch=True)
    restored.epoch_end_reached()
    assert float(restored.reduce_epoch()["m"]) == pytest.approx(3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool])
def test_values_reach_the_loggers_as_python_floats(dtype):
    """What loggers receive (``to_floats``): a Python float per single-element tensor, whatever its dtype or
    shape, without the tensor's graph."""
    from framework.metrics import to_floats

    weight = torch.tensor(3.0, requires_grad=True)
    metrics = {"a": torch.tensor(2.5).to(dtype), "b": torch.tensor([[1.0]]).to(dtype), "loss": weight * 2}
    floats = to_floats(metrics)
    assert list(floats) == ["a", "b", "loss"] and all(type(v) is float for v in floats.values())
    assert floats == {"a": float(torch.tensor(2.5).to(dtype)), "b": 1.0, "loss": 6.0}
    assert to_floats({}) == {}
    with pytest.raises((RuntimeError, ValueError)):
        to_floats({"vector": torch.ones(2)})
