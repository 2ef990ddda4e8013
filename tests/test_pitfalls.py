"""framework.pitfalls: the classic mistakes of hand-written distributed loops end in a clear error or warning.

One test per pitfall (a rank-0-only save in a real two-process gloo job; the model moved after placement;
an optimizer over another copy of the model; optimizer.step() by hand under automatic optimization), plus
the collective rendezvous itself with threads standing in for ranks.
"""

from __future__ import annotations

import copy
import os
import threading
import time
import warnings
from datetime import timedelta

import pytest
import torch

from callbacks import Callback
from framework import Trainer
from framework.pitfalls import CollectiveCallError, PlacementError, check_collective_call
from framework.testing import BoringModule, DistributedJobError, require_distributed, run_distributed


def _trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(default_root_dir=str(tmp_path), max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False)
    return Trainer(**{**defaults, **kwargs})


# ---- 1. a rank-0-only save ---------------------------------------------------------------------------------
class _SavesOnRankZeroOnly(BoringModule):
    def __init__(self, path: str) -> None:
        super().__init__(length=8)
        self.path = path

    def on_train_epoch_end(self) -> None:
        if self.trainer.is_global_zero:  # the mistake: save_checkpoint is collective
            self.trainer.save_checkpoint(self.path)


def _rank_zero_only_save_job(path: str) -> None:
    trainer = Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, default_root_dir=os.path.dirname(path))
    trainer.fit(_SavesOnRankZeroOnly(path))


@pytest.mark.distributed
@require_distributed
def test_a_rank_zero_only_save_ends_the_job_with_a_clear_error_and_no_checkpoint(tmp_path):
    """Before the guard this job hung (rank 0 in the save's broadcast, rank 1 in the next gradient all-reduce)
    or crashed in gloo with mismatched collectives, depending on timing."""
    path = str(tmp_path / "ckpt")
    start = time.monotonic()
    with pytest.raises(DistributedJobError) as info:
        run_distributed(_rank_zero_only_save_job, nproc=2, timeout=120, args=(path,),
                        env={"KILN_COLLECTIVE_TIMEOUT": "3"}, stream=False)
    elapsed = time.monotonic() - start
    rank0 = info.value.results[0]
    assert rank0.returncode not in (0, None), rank0.stderr  # rank 0 raised; it was not killed at a timeout
    assert "CollectiveCallError: trainer.save_checkpoint(" in rank0.stderr
    assert "rank(s) 1 did not call it within 3 s while rank 0 did" in rank0.stderr
    assert "not under `if trainer.is_global_zero:`" in rank0.stderr
    assert sorted(os.listdir(tmp_path)) == []  # nothing written: no checkpoint, complete or partial
    assert elapsed < 100, elapsed


class _Rank:
    """What check_collective_call needs from a strategy."""

    def __init__(self, rank: int, world: int = 2) -> None:
        self.global_rank, self.world_size = rank, world


def _meet(calls: dict[int, str], timeout: float = 5.0) -> dict[int, BaseException | None]:
    """Run check_collective_call on one thread per rank in ``calls``, each with its own store client."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=30), wait_for_workers=False)
    outcome: dict[int, BaseException | None] = {}

    def rank_main(rank: int) -> None:
        client = dist.TCPStore("127.0.0.1", server.port, 1, False, timedelta(seconds=30))
        try:
            check_collective_call(_Rank(rank), calls[rank], timeout=timeout, store=client)
            outcome[rank] = None
        except BaseException as exc:
            outcome[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcome


def test_collective_call_passes_when_every_rank_makes_the_same_call():
    assert _meet({0: "save('a')", 1: "save('a')"}) == {0: None, 1: None}


def test_collective_call_refuses_different_calls_on_every_rank():
    outcome = _meet({0: "save('a') at step 3", 1: "save('b') at step 3"})
    for exc in outcome.values():
        assert isinstance(exc, CollectiveCallError)
        assert "rank 0: save('a') at step 3" in str(exc) and "rank 1: save('b') at step 3" in str(exc)


def test_collective_call_names_the_ranks_that_never_came():
    start = time.monotonic()
    outcome = _meet({0: "trainer.save_checkpoint('x')"}, timeout=0.5)  # rank 1 never calls
    assert isinstance(outcome[0], CollectiveCallError)
    assert "rank(s) 1 did not call it within 0.5 s while rank 0 did" in str(outcome[0])
    assert time.monotonic() - start < 10


def test_collective_call_is_free_on_one_process_and_checks_its_timeout_setting(monkeypatch):
    check_collective_call(_Rank(0, world=1), "anything", store=object())  # never touches the store
    monkeypatch.setenv("KILN_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="KILN_COLLECTIVE_TIMEOUT='soon'"):
        check_collective_call(_Rank(0), "x", store=object())


# ---- 2. the model moved after placement ----------------------------------------------------------------------
class _MovesItself(BoringModule):
    def __init__(self, move, at_batch: int = 1, in_step: bool = False) -> None:
        super().__init__(length=16)
        self.move, self.at_batch, self.in_step = move, at_batch, in_step
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        if self.in_step and batch_idx == self.at_batch:
            self.move(self)
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


class _MoveAfterBatch(Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not module.in_step and batch_idx == module.at_batch:
            module.move(module)


def _replace_layer(module):
    module.layer = torch.nn.Linear(32, 2)


@pytest.mark.parametrize("move, message", [
    (lambda m: m.double(), r"'layer.weight' of _MovesItself moved from cpu/float32 to cpu/float64"),
    (lambda m: m.to(torch.bfloat16), "moved from cpu/float32 to cpu/bfloat16"),
    (lambda m: m.layer.half(), "moved from cpu/float32 to cpu/float16"),
    (lambda m: m.to("meta"), "moved from cpu/float32 to meta/float32"),
], ids=["double", "bf16", "submodule-half", "meta"])
def test_moving_the_model_after_placement_is_detected_at_the_next_step(tmp_path, move, message):
    module = _MovesItself(move, at_batch=1)
    with pytest.raises(PlacementError, match=message):
        _trainer(tmp_path, callbacks=[_MoveAfterBatch()]).fit(module)
    assert module.steps_run == 2  # batches 0 and 1 ran; the move after batch 1 stopped batch 2


def test_a_layer_replaced_during_fit_is_detected_at_the_next_epoch(tmp_path):
    module = _MovesItself(_replace_layer, at_batch=1)  # 8 batches per epoch
    with pytest.raises(PlacementError, match="'layer.weight' of _MovesItself was replaced after the Trainer"):
        _trainer(tmp_path, max_epochs=2, callbacks=[_MoveAfterBatch()]).fit(module)
    assert module.steps_run == 8


def test_a_move_inside_the_step_turns_its_confusing_error_into_the_clear_one(tmp_path):
    module = _MovesItself(lambda m: m.double(), at_batch=0, in_step=True)
    with pytest.raises(PlacementError, match="moved from cpu/float32 to cpu/float64") as info:
        _trainer(tmp_path).fit(module)
    assert isinstance(info.value.__cause__, RuntimeError)  # the original dtype error stays attached


def test_the_step_check_reads_attributes_only(tmp_path):
    """No host sync and no per-parameter work per step: the check reads one parameter's device and dtype."""
    trainer = _trainer(tmp_path)
    trainer.fit(BoringModule(length=4))
    guard = trainer.fit_guard
    calls = []
    guard.check_all = lambda: calls.append(1)  # only reached when the probe parameter changed
    for _ in range(1000):
        guard.check_step()
    assert calls == []


# ---- 3. an optimizer over parameters that are not the module's ---------------------------------------------------
class _OptimizesACopy(BoringModule):
    def configure_optimizers(self):
        return torch.optim.SGD(copy.deepcopy(self).parameters(), lr=0.1)


class _OptimizesAStrayTensor(BoringModule):
    def __init__(self) -> None:
        super().__init__()
        self.temperature = torch.ones(1, requires_grad=True)  # not registered: never placed, wrapped or synced

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.parameters()}, {"params": [self.temperature]}], lr=0.1)


@pytest.mark.parametrize("module_cls, detail", [
    (_OptimizesACopy, r"holding 2 tensor\(s\) that are not parameters of _OptimizesACopy .*group 0: \(2, 32\)"),
    (_OptimizesAStrayTensor, r"holding 1 tensor\(s\) .*group 1: \(1,\)"),
])
def test_an_optimizer_over_foreign_parameters_is_rejected_at_fit_start(tmp_path, module_cls, detail):
    module = module_cls()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=detail) as info:
        _trainer(tmp_path).fit(module)
    assert "inside configure_optimizers() from self.parameters()" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # nothing trained


class _FrozenBackbone(BoringModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer.bias.requires_grad_(False)


def test_frozen_parameters_of_the_module_in_the_optimizer_are_fine(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(_FrozenBackbone())
    assert trainer.global_step == 2


# ---- 4. optimizer.step() by hand under automatic optimization ------------------------------------------------
class _StepsByHand(BoringModule):
    def configure_optimizers(self):
        self.opt = super().configure_optimizers()
        return self.opt

    def on_after_backward(self) -> None:
        self.opt.step()  # the mistake: the Trainer steps it too


class _ManualStepper(BoringModule):
    automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)
        opt.step()
        return loss


@pytest.mark.parametrize("module_cls, expected", [(_StepsByHand, 1), (BoringModule, 0), (_ManualStepper, 0)])
def test_stepping_the_optimizer_by_hand_warns_once(tmp_path, module_cls, expected):
    trainer = _trainer(tmp_path, max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module_cls(length=16))
    hand = [w for w in caught if "called by hand" in str(w.message)]
    assert len(hand) == expected, [str(w.message) for w in caught]
    if hand:
        assert "SGD.step() was called by hand during fit under automatic optimization" in str(hand[0].message)
        assert hand[0].filename == __file__  # points at the user's call
    assert trainer.global_step == 4
    trainer.optimizers[0].step()  # after fit: the user's business, no warning and no hook left behind
