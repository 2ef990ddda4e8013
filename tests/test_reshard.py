"""Resuming on another number of processes (framework/reshard.py): the rest of the epoch is exactly the samples
not seen yet, at the saved global batch, or a clear error. Pure rules, a sampler-level property, and real DDP
jobs that stop on 4 (2) processes and resume on 2 (4), recording every sample id trained."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.reshard import reshard_position, reshard_resume
from framework.sampler import ResumableSampler
from framework.testing import require_distributed, run_distributed

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import reshard_jobs  # noqa: E402


def position(**kwargs):
    args = dict(epoch=0, batches_done=4, saved_processes=4, processes=2, saved_accumulate=1, accumulate=1,
                saved_batch_size=8, batch_size=8)
    return reshard_position(**{**args, **kwargs})


def test_the_global_batch_and_the_sample_position_are_kept():
    with pytest.warns(UserWarning, match=r"accumulate_grad_batches changes from 1 to 2, so each optimizer step still averages 4 batches of 8"):
        shrunk = position()
    assert (shrunk.batches_done, shrunk.accumulate_grad_batches) == (8, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Trainer that already gives K' hears nothing
        assert position(accumulate=2) == shrunk
    grown = position(saved_processes=2, processes=4, saved_accumulate=2, accumulate=1, batches_done=6)
    assert (grown.batches_done, grown.accumulate_grad_batches) == (3, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(saved_processes=2, processes=4), r"accumulate_grad_batches=2/4\. Resume on a number of processes that "
                                           r"divides 2"),
    (dict(saved_processes=3, processes=2, saved_accumulate=2, accumulate=3, batches_done=1),
     r"after 1 batches of epoch 0 on each of 3 processes \(3 batches in all\)"),
    (dict(batch_size=4), r"8 samples per batch and process, this run's training loader has batch_size=4"),
])
def test_what_cannot_be_kept_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        position(**kwargs)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 3), st.integers(1, 4), st.integers(0, 200),
       st.integers(1, 4), st.booleans())
def test_every_sample_is_trained_once_across_the_restart(saved, new, batch, accumulate, size_extra, steps, shuffle):
    """Ranks of the saved run train ``steps`` windows; the resumed ranks take the rest of the epoch from the
    mapped position; together they cover the epoch's samples exactly once (no padding: even=False)."""
    windows = saved * accumulate
    if windows % new:
        return
    size = saved * batch * accumulate * steps + size_extra
    done = steps * accumulate
    moved = reshard_position(epoch=0, batches_done=done, saved_processes=saved, processes=new,
                             saved_accumulate=accumulate, accumulate=windows // new, saved_batch_size=batch,
                             batch_size=batch)
    seen = []
    for rank in range(saved):
        sampler = ResumableSampler(range(size), saved, rank, shuffle=shuffle, seed=5, even=False)
        seen += sampler.epoch_indices()[: done * batch].tolist()
    for rank in range(new):
        sampler = ResumableSampler(range(size), new, rank, shuffle=shuffle, seed=5, even=False)
        sampler.start_at(min(len(sampler), moved.batches_done * batch))
        seen += list(sampler)
    assert sorted(seen) == list(range(size))


def _feed(replicas: int, limit: int | None = None):
    from torch.utils.data import DataLoader

    from framework.data import DataFeed, prepare_dataloader

    loader = prepare_dataloader(DataLoader(range(48), batch_size=2), num_replicas=replicas, rank=0, seed=3)
    return DataFeed(loader, limit)


def test_reshard_resume_maps_the_loop_and_data_state_and_rescales_accumulation():
    from callbacks.accumulation import GradientAccumulation

    saved = _feed(4)
    saved.batches_consumed = 2
    rank0 = saved.state_dict()
    assert (rank0["num_replicas"], rank0["batch_size"]) == (4, 2)
    loop = {"epoch": 0, "batches_done": 2, "epoch_finished": False}
    accumulation = GradientAccumulation({0: 1, 3: 2})
    with pytest.warns(UserWarning, match="accumulate_grad_batches changes from 1 to 2"):
        new_loop, data = reshard_resume(loop, None, rank0, feed=_feed(2), accumulation=accumulation,
                                        saved_accumulation={"schedule": [[0, 1], [3, 2]]})
    assert new_loop["batches_done"] == data["batches_consumed"] == 4 and data["num_replicas"] == 2
    assert data["seed"] == rank0["seed"] and accumulation.schedule == [(0, 2), (3, 4)]
    same = reshard_resume(loop, rank0, rank0, feed=_feed(4), accumulation=accumulation, saved_accumulation=None)
    assert same == (loop, rank0)  # the saved world size: nothing changes
    with pytest.raises(ValueError, match="limit_train_batches counts batches per process"):
        reshard_resume(loop, None, rank0, feed=_feed(2, limit=3), accumulation=accumulation, saved_accumulation=None)


def _records(root: Path, name: str, world: int) -> list[dict]:
    return [json.loads((root / f"{name}-rank{r}.json").read_text()) for r in range(world)]


@require_distributed
@pytest.mark.slow
@pytest.mark.parametrize("saved, new, accumulate", [(4, 2, 1), (2, 4, 2)], ids=["4-to-2", "2-to-4"])
def test_a_ddp_run_resumed_on_another_world_size_trains_the_rest_of_the_epoch_once(tmp_path, saved, new,
                                                                                     accumulate):
    samples, batch = reshard_jobs.SAMPLES, reshard_jobs.BATCH
    steps = samples // (saved * accumulate * batch)  # optimizer steps in the epoch (6 here)
    run_distributed(reshard_jobs.phase, nproc=saved, timeout=240, args=(str(tmp_path), "before", accumulate, 2, False))
    run_distributed(reshard_jobs.phase, nproc=new, timeout=240, args=(str(tmp_path), "after", accumulate, -1, True))
    before, after = _records(tmp_path, "before", saved), _records(tmp_path, "after", new)
    ids = [i for record in before + after for batch_ids in record["ids"] for i in batch_ids]
    assert sorted(ids) == list(range(samples)), ids  # every sample once: none repeated, none skipped
    assert {r["global_step"] for r in after} == {steps}  # the same number of steps as an uninterrupted epoch
    kept = saved * accumulate // new
    assert all(len(r["ids"]) == (steps - 2) * kept for r in after)  # K' batches per rank per remaining step
    said = [w for w in after[0]["warnings"] if "accumulate_grad_batches changes" in w]
    assert said == ([] if kept == accumulate else [said[0]]) and (kept == accumulate or f"to {kept}," in said[0])
