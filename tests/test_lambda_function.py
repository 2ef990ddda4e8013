"""LambdaCallback: functions as hooks, called by a real Trainer; unknown hook names refused."""

from __future__ import annotations

import copy
import pickle

import pytest
from conftest import TinyModule

from callbacks.lambda_function import LambdaCallback
from framework.hooks import Callback


def test_hooks_run_in_a_fit(make_trainer, make_loader):
    calls = []
    callback = LambdaCallback(
        on_fit_start=lambda trainer, module: calls.append("fit_start"),
        on_train_batch_end=lambda trainer, module, outputs, batch, batch_idx: calls.append(batch_idx),
        on_train_epoch_end=lambda trainer, module: calls.append(f"epoch_end {trainer.current_epoch}"),
    )
    assert isinstance(callback, (LambdaCallback, Callback)) and callback.state_key == "LambdaCallback"
    make_trainer(max_epochs=1, callbacks=[callback]).fit(TinyModule(), make_loader(num_samples=12))
    assert calls == ["fit_start", 0, 1, 2, "epoch_end 0"]


def test_instances_do_not_share_hooks(make_trainer, make_loader):
    a, b = [], []
    first = LambdaCallback(on_train_start=lambda t, m: a.append(1))
    second = LambdaCallback(on_train_end=lambda t, m: b.append(1))
    make_trainer(callbacks=[first, second]).fit(TinyModule(), make_loader())
    assert a == [1] and b == [1]
    assert type(first).on_train_end is Callback.on_train_end  # not overridden: never dispatched


def test_unknown_hook_and_non_callable_are_refused():
    with pytest.raises(TypeError, match="on_train_step_end"):
        LambdaCallback(on_train_step_end=lambda t, m: None)
    with pytest.raises(TypeError, match="on_fit_start"):
        LambdaCallback(on_fit_start=3)


def test_copy_and_pickle():
    callback = LambdaCallback(on_fit_start=print)
    for clone in (copy.deepcopy(callback), pickle.loads(pickle.dumps(callback))):
        assert isinstance(clone, LambdaCallback) and type(clone).on_fit_start is print
