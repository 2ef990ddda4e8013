"""MetricCollector driven the way the loops drive it: hand-computed weighted means, batch-size inference,
Lightning's per-hook defaults and refusals, bit-exact state_dict resume, and flat memory over long epochs."""

from __future__ import annotations

import dataclasses
import io
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.exceptions import MisconfigurationException
from framework.metrics import RULES, MetricCollector, infer_batch_size
from framework.metrics.rules import EPOCH, EVAL_STEP, TRAIN_STEP

torchmetrics = pytest.importorskip("torchmetrics")


def run_epoch(collector: MetricCollector, batches: list[torch.Tensor], stage: str = "train", **log_kwargs) -> dict:
    """One epoch as a loop runs it: every batch logs its mean as an epoch value; returns reduce_epoch()."""
    collector.start_stage(stage)
    fx = {"train": "training_step", "validate": "validation_step", "test": "test_step"}[stage]
    for batch in batches:
        collector.on_batch_start((batch, batch * 2))
        collector.current_fx = fx
        collector.log("m", batch.mean(), on_epoch=True, **log_kwargs)
        collector.current_fx = None
        collector.on_batch_end()
    collector.epoch_end_reached()
    out = collector.reduce_epoch()
    collector.end_stage()
    return out


# ---- weighted means, by hand ------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_epoch_mean_is_weighted_by_the_inferred_batch_size(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, generator=g) for n in sizes]
    out = run_epoch(MetricCollector(), batches, stage="validate")
    total = sum(float(b.double().sum()) for b in batches)
    assert float(out["m"]) == pytest.approx(total / sum(sizes), rel=1e-5, abs=1e-5)


def test_weighted_mean_by_hand():
    # batch means 1, 4, 10 with batch sizes 2, 3, 1 -> (2*1 + 3*4 + 1*10) / 6 = 4
    batches = [torch.tensor([0.0, 2.0]), torch.tensor([3.0, 4.0, 5.0]), torch.tensor([10.0])]
    assert float(run_epoch(MetricCollector(), batches, stage="test")["m"]) == 4.0
    # an explicit batch_size wins over the batch: all three weighted 1 -> (1 + 4 + 10) / 3 = 5
    assert float(run_epoch(MetricCollector(), batches, stage="test", batch_size=1)["m"]) == 5.0


def test_training_both_levels_fork_the_name():
    collector = MetricCollector()
    batches = [torch.tensor([1.0, 3.0]), torch.tensor([5.0])]
    out = run_epoch(collector, batches)
    assert set(out) == {"m_epoch"} and float(out["m_epoch"]) == pytest.approx((2 * 2 + 5) / 3)
    metrics = collector.callback_metrics()
    assert set(metrics) == {"m", "m_step", "m_epoch"}
    assert float(metrics["m_step"]) == 5.0 and metrics["m"] is metrics["m_epoch"]


@pytest.mark.parametrize(("reduce_fx", "expected"), [
    ("sum", 16.0), (torch.sum, 16.0), (sum, 16.0), ("max", 9.0), (max, 9.0), ("min", -1.0), (torch.min, -1.0),
    ("avg", 4.0), ("MEAN", 4.0),
])
def test_reductions(reduce_fx, expected):
    collector = MetricCollector()
    collector.start_stage("validate")
    for value in (4.0, 9.0, -1.0, 4.0):
        collector.log("v", torch.tensor(value), reduce_fx=reduce_fx)
    assert float(collector.reduce_epoch()["v"]) == expected


def test_number_values_and_integer_tensors():
    collector = MetricCollector()
    collector.start_stage("validate")
    collector.log("n", 3)
    collector.log("n", 4.5)
    with pytest.warns(UserWarning, match="converted to torch.float32"):
        collector.log("i", torch.tensor(7))
    out = collector.reduce_epoch()
    assert float(out["n"]) == 3.75 and out["i"].dtype == torch.float32 and float(out["i"]) == 7.0


def test_float64_values_accumulate_in_float64():
    collector = MetricCollector()
    collector.start_stage("validate")
    collector.log("d", torch.tensor(1 / 3, dtype=torch.float64))
    assert collector.reduce_epoch()["d"].dtype == torch.float64


# ---- batch-size inference ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Pair:
    text: str
    ids: torch.Tensor


@pytest.mark.parametrize(("batch", "size"), [
    (torch.zeros(5, 3), 5), (torch.tensor(2.0), 1), ((torch.zeros(4), torch.zeros(4, 2)), 4),
    ({"x": torch.zeros(6, 2), "y": torch.zeros(6)}, 6), ([["a"], torch.zeros(3)], 3), (Pair("hi", torch.zeros(7)), 7),
])
def test_infer_batch_size(batch, size):
    assert infer_batch_size(batch) == size


def test_ambiguous_batch_warns_and_takes_the_first_size():
    with pytest.warns(UserWarning, match="ambiguous.*using 4"):
        assert infer_batch_size({"a": torch.zeros(4), "b": torch.zeros(3)}) == 4


def test_batch_without_tensors_asks_for_batch_size():
    with pytest.raises(ValueError, match="batch_size=N"):
        infer_batch_size({"text": "no tensors here"})


def test_size_is_inferred_once_per_batch_and_only_for_means():
    class CountingBatch(list):
        reads = 0

        def __iter__(self):
            CountingBatch.reads += 1
            return super().__iter__()

    collector = MetricCollector()
    collector.start_stage("validate")
    collector.on_batch_start(CountingBatch([torch.zeros(3)]))
    collector.log("s", 1.0, reduce_fx="sum")
    assert CountingBatch.reads == 0
    for name in ("a", "b", "c"):
        collector.log(name, 1.0)
    assert CountingBatch.reads == 1


# ---- Lightning's rules per hook -----------------------------------------------------------------------------
@pytest.mark.parametrize("fx", sorted(RULES))
def test_defaults_and_refusals_per_hook(fx):
    collector = MetricCollector()
    collector.start_stage("train")
    collector.current_fx = fx
    rule = RULES[fx]
    if rule is None:
        with pytest.raises(MisconfigurationException, match=f"cannot be called inside {fx}"):
            collector.log("x", 1.0)
        return
    collector.log("x", 1.0)
    [entry] = collector._entries.values()
    assert (entry.on_step, entry.on_epoch) == (rule.default_on_step, rule.default_on_epoch)
    assert rule in (TRAIN_STEP, EVAL_STEP, EPOCH)
    if rule is EPOCH:
        with pytest.raises(MisconfigurationException, match=f"on_step=True.*not allowed inside {fx}"):
            collector.log("y", 1.0, on_step=True)
        with pytest.raises(ValueError, match="on_epoch=False"):
            collector.log("z", 1.0, on_epoch=False)


def test_unknown_hook_is_refused():
    collector = MetricCollector()
    collector.current_fx = "my_helper"
    with pytest.raises(RuntimeError, match="'my_helper'"):
        collector.log("x", 1.0)


def test_same_name_with_other_options_in_one_hook_is_refused():
    collector = MetricCollector()
    collector.start_stage("validate")
    collector.log("x", 1.0)
    collector.log("x", 2.0)  # same options: fine
    with pytest.raises(ValueError, match="twice in validation_step.. with different options"):
        collector.log("x", 1.0, prog_bar=True)


def test_dataloader_idx_suffix_and_refused_names():
    collector = MetricCollector()
    collector.start_stage("validate")
    for idx, value in ((0, 1.0), (1, 5.0)):
        collector.on_batch_start(torch.zeros(2), dataloader_idx=idx)
        collector.log("v", value)
        collector.log(f"own_{idx}", value, add_dataloader_idx=False, on_step=True)
        assert set(collector.reduce_epoch()) == {f"v/dataloader_idx_{idx}", f"own_{idx}_epoch"}
    # without the suffix one name would mix both loaders' values: Lightning refuses that, and so does Kiln
    with pytest.raises(ValueError, match="twice in validation_step"):
        collector.log("own_0", 1.0, add_dataloader_idx=False, on_step=True)
    with pytest.raises(ValueError, match="add_dataloader_idx=False"):
        collector.log("v/dataloader_idx_0", 1.0)


# ---- resume: bit-exact running state ------------------------------------------------------------------------
def _roundtrip(state: dict) -> dict:
    """Through bytes with torch's weights_only loader: plain data and tensors only, no pickled objects."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class WithMetric(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.acc = torchmetrics.MeanMetric()


def _train_steps(collector: MetricCollector, module: WithMetric, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        collector.on_batch_start(batch)
        collector.current_fx = "training_step"
        collector.log("both", batch.mean() * 1.1, on_epoch=True)
        collector.log("sum", batch.sum(), on_epoch=True, on_step=False, reduce_fx="sum")
        collector.log("max", batch.max(), on_epoch=True, reduce_fx="max")
        collector.log("step_only", batch[0])
        module.acc(batch)
        collector.log("metric", module.acc, on_epoch=True, metric_attribute="acc")
        collector.current_fx = None


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), sizes=st.lists(st.integers(1, 6), min_size=2, max_size=9), data=st.data())
def test_state_dict_resume_is_bit_exact(seed, sizes, data):
    cut = data.draw(st.integers(1, len(sizes) - 1))
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, generator=g) * 1e3 for n in sizes]

    straight, module = MetricCollector(), WithMetric()
    straight.start_stage("train")
    _train_steps(straight, module, batches)

    first, module_a = MetricCollector(), WithMetric()
    first.start_stage("train")
    _train_steps(first, module_a, batches[:cut])
    state = _roundtrip(first.state_dict())
    resumed, module_b = MetricCollector(), WithMetric()  # a fresh process: new objects, nothing shared
    resumed.load_state_dict(state, module=module_b)
    resumed.start_stage("train")  # the loop restarts the epoch it resumes: the restored sums survive it
    _train_steps(resumed, module_b, batches[cut:])

    for collector in (straight, resumed):
        collector.epoch_end_reached()
    expected, got = straight.reduce_epoch(), resumed.reduce_epoch()
    assert set(expected) == set(got) == {"both_epoch", "sum", "max_epoch", "metric_epoch"}
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert {k: v.tolist() for k, v in straight.callback_metrics().items()} == \
        {k: v.tolist() for k, v in resumed.callback_metrics().items()}


def test_restored_state_of_a_finished_epoch_is_not_carried_into_the_next():
    collector = MetricCollector()
    collector.start_stage("train")
    collector.current_fx = "training_step"
    collector.log("x", 5.0, on_epoch=True, on_step=False)
    fresh = MetricCollector()
    fresh.load_state_dict(_roundtrip(collector.state_dict()), resume_mid_epoch=False)
    fresh.start_stage("train")
    fresh.current_fx = "training_step"
    fresh.log("x", 1.0, on_epoch=True, on_step=False)
    assert float(fresh.reduce_epoch()["x"]) == 1.0


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match="state_dict"):
        MetricCollector().load_state_dict({"entries": []})


# ---- memory: flat over any epoch length ---------------------------------------------------------------------
def _held(obj, seen=None) -> tuple[int, int]:
    """(objects, tensor bytes) reachable from the collector through its own containers and entries."""
    seen = set() if seen is None else seen
    if id(obj) in seen or obj is None or isinstance(obj, (str, int, float, bool, torch.dtype, torch.device)):
        return 0, 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return 1, obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__slots__"):
        children = [getattr(obj, s, None) for s in obj.__slots__]
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("framework"):
        children = list(vars(obj).values())
    else:
        return 1, sys.getsizeof(obj)
    counts = [_held(child, seen) for child in children]
    return 1 + sum(c[0] for c in counts), sys.getsizeof(obj) + sum(c[1] for c in counts)


def test_soak_collector_memory_does_not_grow_with_steps():
    """20,000 steps logging 50 epoch-level values each (and 50 step values read every 50 steps)."""
    torch.set_num_threads(1)
    collector = MetricCollector()
    collector.start_stage("train")
    batch = (torch.zeros(16, 4), torch.zeros(16))
    values = [torch.tensor(float(i)) for i in range(50)]
    names = [f"metric_{i}" for i in range(50)]
    sizes = {}
    for step in range(1, 20_001):
        collector.on_batch_start(batch)
        collector.current_fx = "training_step"
        for name, value in zip(names, values):
            collector.log(name, value, on_step=True, on_epoch=True)
        collector.current_fx = None
        collector.on_batch_end()
        if step % 50 == 0:
            assert len(collector.step_values) == 50
        if step in (1_000, 20_000):
            sizes[step] = _held(collector)
    assert sizes[1_000] == sizes[20_000]
    objects, nbytes = sizes[20_000]
    assert objects < 50 * 40 and nbytes < 50 * 4_000, sizes  # a few small objects per key, nothing per step
    collector.epoch_end_reached()
    out = collector.reduce_epoch()
    assert float(out["metric_7_epoch"]) == 7.0


def test_reset_metrics_forgets_everything_but_restored_training_state():
    collector = MetricCollector()
    collector.start_stage("train")
    collector.current_fx = "training_step"
    collector.log("x", 2.0, on_epoch=True)
    assert "x" in collector.callback_metrics()
    state = collector.state_dict()
    collector.reset_metrics()
    assert collector.callback_metrics() == {} and collector.step_values == {}

    resumed = MetricCollector()
    resumed.load_state_dict(state)
    resumed.reset_metrics()  # a run that restores before its reset keeps what it restored
    resumed.start_stage("train")
    resumed.current_fx = "training_step"
    resumed.log("x", 4.0, on_epoch=True)
    resumed.epoch_end_reached()
    assert float(resumed.reduce_epoch()["x_epoch"]) == 3.0


def test_validation_inside_a_training_epoch_sees_the_latest_training_values():
    collector = MetricCollector()
    collector.start_stage("train")
    collector.on_batch_start(torch.zeros(2))
    collector.current_fx = "training_step"
    collector.log("train_loss", 0.25)
    collector.log("train_mean", 1.0, on_epoch=True)
    collector.current_fx = None
    collector.start_stage("validate")  # val_check_interval: nobody read callback_metrics before this
    collector.on_batch_start(torch.zeros(3))
    collector.current_fx = "validation_step"
    collector.log("val_loss", 2.0)
    collector.epoch_end_reached()
    seen = collector.callback_metrics()
    assert {k: float(v) for k, v in seen.items()} == {"train_loss": 0.25, "train_mean": 1.0, "train_mean_step": 1.0,
                                                      "val_loss": 2.0}
    collector.end_stage()
    collector.current_fx = "training_step"
    collector.log("train_mean", 3.0, on_epoch=True)  # the training epoch goes on where it was
    collector.epoch_end_reached()
    assert float(collector.reduce_epoch()["train_mean_epoch"]) == 2.0


def test_a_prediction_stage_refuses_logging_as_lightning_does():
    collector = MetricCollector()
    collector.start_stage("train")
    collector.start_stage("predict")  # a loop that runs predict as a stage gets predict_step's refusal
    with pytest.raises(MisconfigurationException, match="inside predict_step"):
        collector.log("p", 1.0)
    collector.end_stage()
    assert collector.stage == "train"
