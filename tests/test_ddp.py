"""DDPStrategy: real two-process gloo jobs (tests/distributed/ddp_jobs.py) and in-process refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from framework.testing import require_distributed, run_distributed
from strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import ddp_jobs  # noqa: E402
from dist_common import Regression  # noqa: E402

pytestmark = pytest.mark.distributed


@require_distributed
def test_equivalence_accumulation_topology_collectives_and_checkpoint(tmp_path):
    run_distributed(ddp_jobs.equivalence_job, nproc=2, timeout=120, args=(str(tmp_path),))


@require_distributed
def test_manual_accumulation_with_toggle_model_syncs_only_when_asked():
    run_distributed(ddp_jobs.toggle_model_job, nproc=2, timeout=120)


@require_distributed
def test_even_and_uneven_batches_exact_evaluation_and_prediction():
    run_distributed(ddp_jobs.uneven_job, nproc=2, timeout=120)


def test_refuses_a_model_dispatched_with_a_device_map():
    module = Regression()
    module.hf_device_map = {"net.0": 0, "net.2": 1}
    with pytest.raises(ValueError, match="device_map"):
        DDPStrategy().setup_module(module)


@pytest.mark.parametrize("kwargs, error", [
    (dict(accelerator="mps"), ValueError), (dict(timeout=30), TypeError)])
def test_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        DDPStrategy(**kwargs)


def test_registry_builds_ddp_with_options():
    from strategies import resolve_strategy

    strategy = resolve_strategy("ddp", accelerator="cpu", devices=2)
    assert isinstance(strategy, DDPStrategy) and strategy.world_size == 2 and strategy.backend == "gloo"
    assert strategy.root_device == torch.device("cpu")


def test_an_instance_takes_the_trainers_topology_unless_given():
    from framework import Trainer

    trainer = Trainer(strategy=DDPStrategy(static_graph=True), devices=2, logger=False, max_epochs=1)
    assert trainer.strategy.num_devices == 2 and trainer.world_size == 2 and trainer.strategy.static_graph
    trainer = Trainer(strategy=DDPStrategy(devices=3), devices=2, logger=False, max_epochs=1)
    assert trainer.world_size == 3  # what the instance was given wins
    with pytest.raises(ValueError, match="accelerator='mps' is not supported by strategy='ddp'"):
        Trainer(strategy=DDPStrategy(), accelerator="mps", logger=False, max_epochs=1)


def test_one_process_ddp_trains_in_process():
    """devices=1 without a launcher: a one-process gloo group on a free port; collectives are identities."""
    module = Regression()
    strategy = DDPStrategy()
    try:
        from framework import Trainer

        trainer = Trainer(strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False)
        trainer.fit(module, torch.utils.data.DataLoader(ddp_jobs.dataset(6), batch_size=2))
        assert trainer.global_step == 3 and torch.distributed.get_world_size() == 1
        assert strategy.all_gather(torch.tensor(1.0)).tolist() == [1.0]
        assert strategy.reduce_boolean_decision(True) is True
    finally:
        strategy.destroy_process_group()
    assert not torch.distributed.is_initialized()


def test_an_unhandled_error_lets_go_of_its_traceback_before_the_group_is_destroyed():
    """At exit after an unhandled error, Kiln's handler frees what the traceback holds (the Trainer, its DDP
    wrapper and their references to the group) while Python still runs: freed during interpreter finalization
    instead, gloo's threads aborted the process now and then (exit -6 instead of 1, "terminate called without an
    active exception" — tests/test_distributed_faults.py saw it in about 1 of 4 runs)."""
    import sys
    import weakref

    from framework import Trainer
    from strategies.parallel import _destroy_process_group

    def failing_run() -> None:
        trainer = Trainer(strategy=DDPStrategy(), max_epochs=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False)
        trainer.fit(Regression(), torch.utils.data.DataLoader(ddp_jobs.dataset(4), batch_size=2))
        raise RuntimeError("the script failed after fit")

    try:
        failing_run()
    except RuntimeError as error:  # what the interpreter records for an unhandled error before exit handlers
        sys.last_type, sys.last_value, sys.last_traceback = type(error), error, error.__traceback__
        trainer = weakref.ref(error.__traceback__.tb_next.tb_frame.f_locals["trainer"])
    try:
        assert trainer() is not None and torch.distributed.is_initialized()
        _destroy_process_group()
        assert trainer() is None and sys.last_traceback is None
        assert not torch.distributed.is_initialized()
    finally:
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                delattr(sys, name)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
