"""framework.testing: skip decorators, run_distributed with scripts and functions, BoringModule and the
random datasets, and the bit-identity assertions (their failure messages name the entry and the gap).

run_distributed's function mode, failing-function and timeout paths are covered in tests/test_launch.py.
"""

from __future__ import annotations

import importlib.util
import unittest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from framework import Trainer, seed_everything
from framework.testing import (
    BoringModule,
    DistributedJobError,
    RandomDataset,
    RandomIterableDataset,
    assert_checkpoints_equal,
    assert_modules_equal,
    assert_state_equal,
    require_bf16,
    require_cuda,
    require_deepspeed,
    require_distributed,
    require_fp16,
    require_multi_device,
    require_xla,
    run_distributed,
)
from framework.testing.compare import state_differences


# ---- skip decorators ------------------------------------------------------------------------------
def _cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("decorator, available, reason", [
    (require_cuda, _cuda_devices() > 0, "needs a CUDA device"),
    (require_multi_device, _cuda_devices() > 1, "needs at least two CUDA devices"),
    (require_deepspeed, importlib.util.find_spec("deepspeed") is not None, "needs deepspeed"),
    (require_xla, importlib.util.find_spec("torch_xla") is not None, "needs torch_xla"),
    (require_distributed, torch.distributed.is_available(), "needs torch.distributed with gloo"),
])
def test_require_decorators_skip_with_their_reason_exactly_when_unavailable(decorator, available, reason):
    ran = []
    test = decorator(lambda: ran.append(True))
    if available:
        test()
        assert ran == [True]
    else:
        with pytest.raises(unittest.SkipTest, match=reason):
            test()
        assert ran == []


@pytest.mark.parametrize("decorator, dtype", [(require_fp16, torch.float16), (require_bf16, torch.bfloat16)])
def test_half_precision_decorators_agree_with_autocast(decorator, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with torch.autocast(device, dtype=dtype):
            works = (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype == dtype
    except (RuntimeError, TypeError):
        works = False
    skipped = getattr(decorator(lambda: None), "__unittest_skip__", False)
    assert skipped == (not works)


# ---- run_distributed --------------------------------------------------------------------------------
_SCRIPT = """
import os, sys
rank = int(os.environ["RANK"])
print(f"rank={rank} world={os.environ['WORLD_SIZE']} local={os.environ['LOCAL_RANK']} arg={sys.argv[1]} "
      f"extra={os.environ.get('EXTRA')}")
if rank in FAILING:
    sys.exit(f"rank {rank} gives up")
"""


def _script(tmp_path, fail=()) -> str:
    path = tmp_path / "job.py"
    path.write_text(_SCRIPT.replace("FAILING", repr(tuple(fail))))
    return str(path)


def test_run_distributed_runs_a_script_with_torchrun_environment_and_streams_each_rank(tmp_path, capsys):
    results = run_distributed(_script(tmp_path), nproc=3, timeout=60, args=("hello",), env={"EXTRA": "x"})
    assert [r.returncode for r in results] == [0, 0, 0]
    for r in results:
        assert r.stdout == f"rank={r.rank} world=3 local={r.rank} arg=hello extra=x\n"
    streamed = capsys.readouterr().out
    assert all(f"[rank {r}] rank={r} world=3" in streamed for r in range(3))


def test_run_distributed_reports_every_failing_rank(tmp_path):
    with pytest.raises(DistributedJobError) as info:
        run_distributed(_script(tmp_path, fail=(0, 2)), nproc=3, timeout=60, args=("a",), stream=False)
    message = str(info.value)
    assert "2 of 3 ranks failed (ranks 0, 2)" in message
    assert "rank 0 gives up" in message and "rank 2 gives up" in message and "rank 1 (" not in message
    assert [r.returncode for r in info.value.results] == [1, 0, 1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(nproc=0), "nproc=0"), (dict(nproc=True), "nproc=True"), (dict(timeout=0), "timeout=0")])
def test_run_distributed_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_distributed(_script(tmp_path), **kwargs)


# ---- BoringModule and datasets ----------------------------------------------------------------------------
def test_boring_module_runs_every_entry_point_without_data_arguments(tmp_path):
    seed_everything(0)
    module = BoringModule(length=8)
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_progress_bar=False)
    before = module.layer.weight.detach().clone()
    trainer.fit(module)
    assert trainer.global_step == 4 and not torch.equal(before, module.layer.weight)
    assert set(trainer.callback_metrics) >= {"train_loss", "val_loss"}
    assert trainer.validate(module)[0].keys() == {"val_loss"}
    assert trainer.test(module)[0].keys() == {"test_loss"}
    predictions = trainer.predict(module)
    assert len(predictions) == 4 and predictions[0].shape == (2, 2)


def test_random_dataset_is_reproducible_per_seed_and_ignores_the_global_rng():
    torch.manual_seed(1)
    a = RandomDataset(size=5, length=7, seed=3)
    torch.manual_seed(2)
    b = RandomDataset(size=5, length=7, seed=3)
    assert len(a) == 7 and a[0].shape == (5,) and a[0].dtype == torch.float32
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, RandomDataset(5, 7, seed=4).data)
    with pytest.raises(ValueError, match="length=0"):
        RandomDataset(length=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_random_iterable_dataset_yields_each_row_once_across_workers(num_workers):
    dataset = RandomIterableDataset(size=3, count=10, seed=5)
    assert not hasattr(dataset, "__len__")
    rows = torch.cat(list(DataLoader(dataset, batch_size=3, num_workers=num_workers)))
    expected = RandomDataset(3, 10, seed=5).data
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, expected.tolist()))


def test_random_iterable_dataset_shards_between_ranks(monkeypatch):
    import framework.testing.boring as boring

    dataset = RandomIterableDataset(size=2, count=7)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(boring, "_rank_and_world", lambda rank=rank: (rank, 3))
        shards.append(torch.stack(list(dataset)))
    assert [len(s) for s in shards] == [3, 2, 2]
    assert torch.equal(torch.cat(shards).sort(0).values, dataset.data.sort(0).values)


# ---- bit-identity assertions --------------------------------------------------------------------------------
def test_assert_modules_equal_names_the_key_and_the_largest_difference():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert_modules_equal(a, b)
    with torch.no_grad():
        b.weight[2, 1] += 0.25
        b.weight[0, 0] += 1e-7
    with pytest.raises(AssertionError) as info:
        assert_modules_equal(a, b)
    message = str(info.value)
    assert "differ in 1 place(s)" in message and "weight: 2 of 12 elements differ" in message
    assert "max abs diff 0.25 at (2, 1)" in message
    assert_modules_equal(a, b, atol=0.3)


@pytest.mark.parametrize("a, b, fragment", [
    ({"x": torch.zeros(2)}, {"x": torch.zeros(2, dtype=torch.float64)}, "x: dtype torch.float32 vs torch.float64"),
    ({"x": torch.zeros(2)}, {"x": torch.zeros(3)}, "x: shape (2,) vs (3,)"),
    ({"x": torch.tensor(0.0)}, {"x": torch.tensor(-0.0)}, "x: 1 of 1 elements differ"),
    ({"x": 1, "y": 2}, {"x": 1, "z": 2}, "<root>: keys only in a ['y'], only in b ['z']"),
    ({"s": [1, 2.5]}, {"s": [1, 2.0]}, "s.1: 2.5 vs 2.0"),
    ({"s": [1, 2]}, {"s": [1]}, "s: length 2 vs 1"),
    ({"t": torch.ones(1)}, {"t": 1.0}, "t: tensor(1,) torch.float32 vs float"),
])
def test_assert_state_equal_explains_each_kind_of_difference(a, b, fragment):
    with pytest.raises(AssertionError, match="The states differ") as info:
        assert_state_equal(a, b)
    assert fragment in str(info.value)


def test_nans_in_the_same_places_are_equal():
    nan = float("nan")
    assert_state_equal({"x": torch.tensor([1.0, nan]), "y": nan}, {"x": torch.tensor([1.0, nan]), "y": nan})
    assert_state_equal({"x": torch.tensor([1.0, nan])}, {"x": torch.tensor([1.0 + 1e-6, nan])}, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
def test_a_single_changed_element_is_reported_exactly(shape, data):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    index = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    delta = data.draw(st.floats(1e-3, 1e3))
    b = a.clone()
    b[index] += delta
    (line,) = state_differences({"w": a}, {"w": b})
    assert line.startswith(f"w: 1 of {a.numel()} elements differ") and f"at {index}" in line
    gap = float(line.split("max abs diff ")[1].split(" ")[0])
    assert gap == pytest.approx((b[index].double() - a[index].double()).abs().item(), rel=1e-5)


def _fit_and_save(root, lr: float = 0.1) -> str:
    seed_everything(7)
    trainer = Trainer(default_root_dir=str(root), max_epochs=1, logger=False, enable_progress_bar=False)
    trainer.fit(BoringModule(length=8, lr=lr))
    trainer.save_checkpoint(str(root / "final"))
    return str(root / "final")


def test_assert_checkpoints_equal_compares_weights_optimizers_loop_and_rng(tmp_path):
    first, second = _fit_and_save(tmp_path / "a"), _fit_and_save(tmp_path / "b")
    assert_checkpoints_equal(first, second)  # ModelCheckpoint's folder names are ignored by default
    with pytest.raises(AssertionError, match=r"ModelCheckpoint\{.*\}\.dirpath"):
        assert_checkpoints_equal(first, second, ignore=())
    other = _fit_and_save(tmp_path / "c", lr=0.2)
    with pytest.raises(AssertionError) as info:
        assert_checkpoints_equal(first, other)
    message = str(info.value)
    assert "model.layer.weight: 64 of 64 elements differ" in message
    assert "trainer.optimizers.0.param_groups.0.lr: 0.1 vs 0.2" in message


def test_assertion_helpers_refuse_bad_arguments():
    with pytest.raises(TypeError, match="a=dict is not a torch.nn.Module"):
        assert_modules_equal({}, torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="atol=-1"):
        assert_state_equal({}, {}, atol=-1)
