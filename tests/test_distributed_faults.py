"""Distributed faults without Kiln's launcher (ranks started like torchrun does, by ``run_distributed``): a rank
that raises, dies or hangs must not leave the others blocked. They exit on their own — ``run_distributed``
would kill a rank still running 10 s after the first failure, and ``killed`` says so — with an error that
names the original failure when the failing rank could report it.

The jobs are ``tests/scripts/fault_run.py`` on two gloo ranks. Killed ranks, kills during saves and
preemption under Kiln's launcher are in tests/test_fault_injection.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from callbacks.rank_failures import RankFailureReport, is_peer_failure
from framework.testing import DistributedJobError, require_distributed, run_distributed

SCRIPT = Path(__file__).parent / "scripts" / "fault_run.py"
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def failing_job(tmp_path: Path, fault: str, rank: int, *args: str) -> list:
    with pytest.raises(DistributedJobError) as info:
        run_distributed(SCRIPT, nproc=2, timeout=150, stream=False,
                        args=["--root", str(tmp_path), "--out", str(tmp_path / "out.safetensors"), "--devices", "2",
                              "--max-epochs", "1", "--fault", fault, "--fault-rank", str(rank), "--fault-step", "3",
                              *args])
    return info.value.results


@require_distributed
def test_a_raising_rank_ends_the_job_and_the_others_name_its_error(tmp_path):
    failed, other = failing_job(tmp_path, "raise", 1)[::-1]
    assert failed.returncode == 1 and "RuntimeError: injected failure on rank 1 at step 3" in failed.stderr
    assert not other.killed and other.returncode not in (0, None), other
    assert "[kiln] rank 0 failed because rank 1 failed first with: RuntimeError: injected failure on rank 1 at " \
           "step 3" in other.stderr, other.stderr[-3000:]


@require_distributed
def test_a_killed_rank_0_does_not_leave_rank_1_waiting(tmp_path):
    killed, other = failing_job(tmp_path, "sigkill", 0)
    assert killed.returncode == -9 and not killed.killed  # it killed itself
    assert not other.killed and other.returncode not in (0, None), other.stderr[-3000:]


@require_distributed
def test_a_hung_rank_makes_the_others_fail_after_the_collective_timeout(tmp_path, monkeypatch):
    import framework.testing.distributed

    monkeypatch.setattr(framework.testing.distributed, "_FAILURE_GRACE_S", 2.0)  # the hung rank is killed sooner
    other, hung = failing_job(tmp_path, "hang", 1, "--timeout", "6")
    assert hung.killed  # still sleeping when run_distributed gave up on the job
    assert not other.killed and other.returncode not in (0, None), other.stderr[-3000:]
    assert "Timed out" in other.stderr and "probably died" in other.stderr and "or hung" in other.stderr


@pytest.mark.parametrize("exception, expected", [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1"), True),
    (RuntimeError("Timed out waiting 5000ms for recv operation to complete"), True),
    (dist.DistBackendError("NCCL communicator was aborted"), True),
    (RuntimeError("CUDA out of memory"), False),
    (ValueError("Connection closed by peer"), False),
])
def test_transport_errors_are_told_from_original_ones(exception, expected):
    assert is_peer_failure(exception) is expected


def test_only_multi_process_trainers_carry_the_report(make_trainer):
    assert not any(isinstance(cb, RankFailureReport) for cb in make_trainer().callbacks)
    from strategies import DDPStrategy

    trainer = make_trainer(strategy=DDPStrategy(devices=2))
    assert any(isinstance(cb, RankFailureReport) for cb in trainer.callbacks)
