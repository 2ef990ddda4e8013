"""GradientAccumulation: window boundaries, exact big-batch equivalence, num_items, schedules, limits.

The Trainer runs in float64 ("64-true") so that "equal to big-batch SGD" can be checked to 1e-6 (in
practice ~1e-14): any wrong divisor, missed tail window or step in the wrong place shows up at once.
The reference is plain SGD on the concatenation of each window's batches, built from the batches the
module actually saw (so the test does not depend on the loader's order).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from callbacks import Callback, GradientAccumulation
from callbacks.accumulation import WindowPlan
from framework import TrainModule

LR = 0.1
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Regressor(TrainModule):
    """A small tanh MLP with mean-squared error; records every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        assert x.dtype == torch.float64  # "64-true" converted the inputs
        self.seen.append((x.clone(), y.clone()))
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=LR)


class StepRecorder(Callback):
    """``(epoch, batch_idx, sync_gradients, global_step)`` after every training batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, bool, int]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append((trainer.current_epoch, batch_idx, trainer.sync_gradients, trainer.global_step))


class BatchStream(IterableDataset):
    """Pre-batched ``(x, y)`` pairs with no ``__len__``: the Trainer must look one batch ahead."""

    def __init__(self, dataset: Dataset, batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self):
        tensors = self.dataset.tensors
        for start in range(0, len(tensors[0]), self.batch_size):
            yield tuple(t[start:start + self.batch_size] for t in tensors)


def make_loader(dataset: TensorDataset, batch_size: int, kind: str) -> DataLoader:
    if kind == "map":
        return DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return DataLoader(BatchStream(dataset, batch_size), batch_size=None)


def expected_windows(batches_per_epoch: list[int], factors: list[int]) -> list[list[int]]:
    """Per epoch, the window lengths the contract prescribes (the last one may be short)."""
    return [[min(k, n - start) for start in range(0, n, k)] for n, k in zip(batches_per_epoch, factors)]


def reference_sgd(initial: torch.nn.Module, windows: list[list[tuple[torch.Tensor, ...]]], loss_fn) -> torch.nn.Module:
    """One plain SGD step per window on the loss of the concatenated window."""
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for window in windows:
        batch = tuple(torch.cat(parts) for parts in zip(*window))
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    return model


def assert_params_close(actual: torch.nn.Module, expected: torch.nn.Module, atol: float = 1e-6) -> None:
    for (name, a), b in zip(actual.named_parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def split_into_windows(seen: list, window_lengths: list[list[int]]) -> list[list]:
    windows, position = [], 0
    for lengths in window_lengths:
        for length in lengths:
            windows.append(seen[position:position + length])
            position += length
    assert position == len(seen)
    return windows


def mse(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


# ---- the property: accumulated training == big-batch SGD, steps exactly at window ends ----------------


@PROPERTY
@given(
    num_batches=st.integers(1, 9),
    batch_size=st.integers(1, 4),
    accumulate=st.one_of(
        st.integers(1, 5),
        st.fixed_dictionaries({0: st.integers(1, 4), 1: st.integers(1, 4)}),
        st.fixed_dictionaries({1: st.integers(2, 4)}),
    ),
    epochs=st.integers(1, 3),
    kind=st.sampled_from(["map", "iterable"]),
    limit=st.one_of(st.none(), st.integers(1, 10)),
    seed=st.integers(0, 2**16),
)
def test_accumulation_equals_big_batch_sgd(make_trainer, num_batches, batch_size, accumulate, epochs, kind, limit,
                                           seed):
    g = torch.Generator().manual_seed(seed)
    n = num_batches * batch_size
    dataset = TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))
    module = Regressor()
    initial = copy.deepcopy(module.net).double()
    recorder = StepRecorder()
    trainer = make_trainer(precision="64-true", max_epochs=epochs, accumulate_grad_batches=accumulate,
                           limit_train_batches=limit, callbacks=[recorder])
    trainer.fit(module, make_loader(dataset, batch_size, kind))

    schedule = GradientAccumulation(accumulate)
    factors = [schedule.factor(e) for e in range(epochs)]
    per_epoch = [num_batches if limit is None else min(num_batches, limit)] * epochs
    window_lengths = expected_windows(per_epoch, factors)

    # Steps exactly at the window ends, the short last window of every epoch included.
    expected_rows, steps = [], 0
    for epoch, lengths in enumerate(window_lengths):
        batch_idx = 0
        for length in lengths:
            for position in range(length):
                closes = position == length - 1
                steps += closes
                expected_rows.append((epoch, batch_idx, closes, steps))
                batch_idx += 1
    assert recorder.rows == expected_rows
    assert trainer.global_step == steps and trainer.skipped_steps == 0

    reference = reference_sgd(initial, split_into_windows(module.seen, window_lengths), mse)
    assert_params_close(module.net, reference)


def test_accumulation_is_not_per_batch_sgd(make_trainer):
    """Guard for the property above: with K>1 the result really differs from stepping every batch."""
    g = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g))
    module = Regressor()
    initial = copy.deepcopy(module.net).double()
    make_trainer(precision="64-true", accumulate_grad_batches=3).fit(module, make_loader(dataset, 2, "map"))
    per_batch = reference_sgd(initial, [[b] for b in module.seen], mse)
    with pytest.raises(AssertionError):
        assert_params_close(module.net, per_batch)
    assert_params_close(module.net, reference_sgd(initial, split_into_windows(module.seen, [[3, 3]]), mse))


# ---- num_items: summed loss / global item count == the big-batch token mean ---------------------------


class TokenRegressor(TrainModule):
    """Per-token regression on padded sequences; the loss is summed over the real (unmasked) tokens."""

    def __init__(self, count_as: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        self.count_as = count_as
        self.seen: list[tuple[torch.Tensor, ...]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(tuple(t.clone() for t in batch))
        return token_loss_sum(self.net, batch)

    def num_items(self, batch: Any) -> Any:
        count = batch[2].sum()
        return int(count) if self.count_as == "int" else count

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=LR)


def token_loss_sum(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y, mask = batch
    return ((model(x).squeeze(-1) - y) ** 2 * mask).sum()


def token_mean(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return token_loss_sum(model, batch) / batch[2].sum().clamp_min(1)


def padded_sequences(num_sequences: int, max_len: int, g: torch.Generator) -> TensorDataset:
    lengths = torch.randint(0, max_len + 1, (num_sequences,), generator=g)
    mask = (torch.arange(max_len) < lengths[:, None]).long()  # long: "64-true" must leave it alone
    x = torch.randn(num_sequences, max_len, 3, generator=g)
    y = torch.randn(num_sequences, max_len, generator=g)
    return TensorDataset(x, y, mask)


@PROPERTY
@given(
    num_sequences=st.integers(1, 14),
    batch_size=st.integers(1, 4),
    accumulate=st.integers(1, 4),
    epochs=st.integers(1, 2),
    kind=st.sampled_from(["map", "iterable"]),
    limit=st.one_of(st.none(), st.integers(1, 5)),
    count_as=st.sampled_from(["tensor", "int"]),
    seed=st.integers(0, 2**16),
)
def test_num_items_gives_the_big_batch_token_mean(make_trainer, num_sequences, batch_size, accumulate, epochs, kind,
                                                  limit, count_as, seed):
    g = torch.Generator().manual_seed(seed)
    dataset = padded_sequences(num_sequences, 5, g)
    module = TokenRegressor(count_as)
    initial = copy.deepcopy(module.net).double()
    trainer = make_trainer(precision="64-true", max_epochs=epochs, accumulate_grad_batches=accumulate,
                           limit_train_batches=limit)
    trainer.fit(module, make_loader(dataset, batch_size, kind))

    num_batches = -(-num_sequences // batch_size)
    per_epoch = [num_batches if limit is None else min(num_batches, limit)] * epochs
    window_lengths = expected_windows(per_epoch, [accumulate] * epochs)
    assert trainer.global_step == sum(len(lengths) for lengths in window_lengths)
    reference = reference_sgd(initial, split_into_windows(module.seen, window_lengths), token_mean)
    assert_params_close(module.net, reference, atol=1e-9)


def test_num_items_differs_from_mean_of_batch_means(make_trainer):
    """Guard: with unequal token counts the per-batch-mean answer is measurably different."""
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(3))
    y = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    module = TokenRegressor()
    initial = copy.deepcopy(module.net).double()
    make_trainer(precision="64-true", accumulate_grad_batches=2).fit(
        module, make_loader(TensorDataset(x, y, mask), 1, "map"))
    windows = split_into_windows(module.seen, [[2, 2]])
    assert_params_close(module.net, reference_sgd(initial, windows, token_mean), atol=1e-9)

    def mean_of_means(model, batch):
        return sum(token_mean(model, tuple(t[i:i + 1] for t in batch)) for i in range(len(batch[0]))) / len(batch[0])

    with pytest.raises(AssertionError):
        assert_params_close(module.net, reference_sgd(initial, windows, mean_of_means), atol=1e-6)


# ---- the rule itself ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "num_batches", "expected"),
    [
        (3, 7, [(False, 3), (False, 3), (True, 3), (False, 3), (False, 3), (True, 3), (True, 1)]),
        (4, 6, [(False, 4), (False, 4), (False, 4), (True, 4), (False, 2), (True, 2)]),
        (5, 2, [(False, 2), (True, 2)]),
        (1, 3, [(True, 1)] * 3),
    ],
)
def test_window_plan_with_known_length(k, num_batches, expected):
    plan = WindowPlan(k, num_batches)
    got = [plan.window(i, i == num_batches - 1) for i in range(num_batches)]
    assert got == expected
    assert all(plan.tail_correction(i) is None for i in range(num_batches))


@pytest.mark.parametrize(("k", "num_batches", "correction"), [(3, 7, 3.0), (4, 6, 2.0), (3, 6, None), (5, 2, 2.5)])
def test_window_plan_unknown_length_divides_by_k_and_corrects_the_tail(k, num_batches, correction):
    plan = WindowPlan(k, None)
    got = [plan.window(i, i == num_batches - 1) for i in range(num_batches)]
    assert [divisor for _, divisor in got] == [k] * num_batches
    assert [sync for sync, _ in got] == [(i + 1) % k == 0 or i == num_batches - 1 for i in range(num_batches)]
    assert plan.tail_correction(num_batches - 1) == correction


def test_schedule_factor_per_epoch():
    schedule = GradientAccumulation({0: 1, 2: 3, 5: 2})
    assert [schedule.factor(e) for e in range(7)] == [1, 1, 3, 3, 3, 2, 2]
    assert GradientAccumulation({3: 4}).factor(0) == 1


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-2, ValueError), (True, TypeError), (2.0, TypeError), ("4", TypeError), ({}, TypeError),
     ({0: 0}, ValueError), ({-1: 2}, ValueError), ({"0": 2}, ValueError), ({0: 2.5}, ValueError)],
)
def test_invalid_accumulate_grad_batches_is_refused(make_trainer, value, error):
    with pytest.raises(error, match="accumulate_grad_batches"):
        make_trainer(accumulate_grad_batches=value)


class StopAt(Callback):
    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            trainer.should_stop = True
            self.batch_idx = -1


def test_a_window_cut_short_by_a_stop_does_not_leak_into_the_next_fit(make_trainer):
    """Stopping mid-window leaves that window's gradients unstepped; the next fit starts from clean ones."""
    g = torch.Generator().manual_seed(5)
    dataset = TensorDataset(torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g))
    module = Regressor()
    initial = copy.deepcopy(module.net).double()
    trainer = make_trainer(precision="64-true", accumulate_grad_batches=3, callbacks=[StopAt(batch_idx=4)])
    loader = make_loader(dataset, 2, "map")
    trainer.fit(module, loader)
    assert trainer.global_step == 1 and trainer.current_epoch == 1  # Lightning counts the epoch the stop cut
    first_window = module.seen[:3]
    module.seen.clear()
    trainer.fit(module, loader)  # runs epoch 0 again, from its first batch
    assert trainer.global_step == 3
    windows = [first_window] + split_into_windows(module.seen, [[3, 3]])
    assert_params_close(module.net, reference_sgd(initial, windows, mse))
