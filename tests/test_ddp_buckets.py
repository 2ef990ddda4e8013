"""DDP resume is bit-exact at 3 and 4 ranks (issue #19): the resumed wrapper reduces with the saved run's
bucket layout (strategies/ddp_buckets.py). Real gloo jobs; the model and settings are the issue's table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from framework.testing import require_distributed, run_distributed

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import resume_jobs  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@require_distributed
def test_three_ranks_resume_bit_exact_with_every_ddp_variant(tmp_path):
    # (the table's bucket_cap_mb=1000 is the default layout for a model this small; 0.02 MB makes several buckets)
    cases = [({}, 3), ({"bucket_cap_mb": 0.02}, 1), ({"static_graph": True}, 3), ({"find_unused_parameters": True}, 1)]
    run_distributed(resume_jobs.resume_job, nproc=3, timeout=600, args=(str(tmp_path), cases, True))


@require_distributed
def test_four_ranks_resume_bit_exact(tmp_path):
    run_distributed(resume_jobs.resume_job, nproc=4, timeout=600, args=(str(tmp_path), [({}, 3)], False))


class _Net(torch.nn.Module):
    """A sparse embedding and a head registered before the layer that feeds it: DDP's rebuilt layout differs
    from its initial one."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(8, 1)
        self.body = torch.nn.Linear(8, 8)
        self.embed = torch.nn.Embedding(10, 8, sparse=True)
        self.forwards = 0
        self.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)).relu()).sum()


def _layout(ddp) -> list[list[int]]:
    index = {id(p): i for i, p in enumerate(ddp.module.parameters())}
    return [[index[id(p)] for p in bucket.parameters()] for bucket in ddp.reducer._get_zeros_like_grad_buckets()]


def test_replay_gives_a_new_wrapper_the_rebuilt_layout_without_running_the_model():
    """One in-process gloo rank: what the layout is, not how sums associate (the jobs above check that)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from framework.launch import find_free_port
    from strategies.ddp_buckets import BucketOrder
    from strategies.parallel import _StepDispatcher

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    try:
        net, ids = _Net(), torch.tensor([[1, 2, 3]])
        step = lambda: net(ids)  # noqa: E731  (run through the wrapper: a callable goes straight to the dispatcher)
        first = DistributedDataParallel(_StepDispatcher(net))
        recorder = BucketOrder(first, static_graph=False, find_unused_parameters=False)
        first(step).backward()
        recorder.after_backward(synchronised=True)
        initial = _layout(first)  # (read after a backward: a sparse bucket has no tensor before)
        assert not recorder.recording and recorder.orders
        first(step).backward()  # the rebuild happens in this forward
        rebuilt = _layout(first)
        assert rebuilt != initial

        second = DistributedDataParallel(_StepDispatcher(net))
        before = net.forwards
        BucketOrder(second, static_graph=False, find_unused_parameters=False).replay(recorder.state_dict())
        assert net.forwards == before and all(p.grad is None for p in net.parameters())
        second(step).backward()
        assert _layout(second) == rebuilt
        del first, second, recorder  # the reducers hold the group: free them before it goes (else teardown can hang)
    finally:
        import gc

        gc.collect()
        dist.destroy_process_group()
