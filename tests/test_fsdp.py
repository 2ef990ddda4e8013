"""FSDPStrategy (FSDP2): real two-process gloo jobs (tests/distributed/fsdp_jobs.py) and argument checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch import nn

from framework.testing import require_distributed, run_distributed
from strategies import FSDPStrategy

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import fsdp_jobs  # noqa: E402
from dist_common import Regression  # noqa: E402

pytestmark = pytest.mark.distributed


@require_distributed
def test_equivalence_clipping_accumulation_and_uneven_evaluation():
    run_distributed(fsdp_jobs.equivalence_job, nproc=2, timeout=120)


@require_distributed
def test_tied_weights_precision_and_memory_per_rank_about_half_of_ddp(tmp_path):
    out = tmp_path / "numel.txt"
    run_distributed(fsdp_jobs.tied_precision_memory_job, nproc=2, timeout=120, args=(str(out),))
    fsdp, ddp, ratio = out.read_text().split()
    assert float(ratio) <= 0.55 and int(fsdp) < int(ddp)


@require_distributed
def test_checkpoints_resume_bit_exact_and_reshard_to_one_process(tmp_path):
    import torch

    from framework import Trainer, read_checkpoint
    from framework.checkpoint import read_manifest
    from framework.checkpoint.consolidate import read_model_state

    run_distributed(fsdp_jobs.checkpoint_job, nproc=2, timeout=150, args=(str(tmp_path),))
    assert read_manifest(str(tmp_path / "sharded")).layout == "dcp"
    assert read_manifest(str(tmp_path / "full")).layout == "full"
    for kind in ("sharded", "full"):  # both layouts consolidate to the same full state dict in one process
        saved = torch.load(tmp_path / f"{kind}-step3.pt")
        loaded = read_model_state(str(tmp_path / kind))
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
        as_lightning = read_checkpoint(str(tmp_path / kind))  # torch.load's dict for Lightning's file
        assert all(torch.equal(as_lightning["state_dict"][k], saved[k]) for k in saved)
        assert as_lightning["global_step"] == 3
        # whole optimizer states only where the checkpoint holds them (sharded ones stay per rank, as in Lightning)
        assert ("optimizer_states" in as_lightning) == (kind == "full")

    # the two-rank sharded checkpoint resumes under a one-process FSDP group (DCP reshards)
    seen = {}

    class Capture(fsdp_jobs.Callback):
        def on_train_start(self, trainer, module):
            seen["step"] = trainer.global_step
            seen["state"] = {k: v.clone() for k, v in trainer.strategy.module_state_dict().items()}

    strategy = FSDPStrategy()
    try:
        trainer = Trainer(strategy=strategy, max_steps=4, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, callbacks=[Capture()])
        with pytest.warns(UserWarning, match="world size 2"):
            trainer.fit(fsdp_jobs.AdamRegression(), fsdp_jobs.loader(16, 2), ckpt_path=str(tmp_path / "sharded"))
    finally:
        strategy.destroy_process_group()
    assert seen["step"] == 3 and trainer.global_step == 4
    saved = torch.load(tmp_path / "sharded-step3.pt")
    assert all(torch.equal(seen["state"][k], saved[k]) for k in saved)


def test_refuses_a_model_dispatched_with_a_device_map():
    module = Regression()
    module.hf_device_map = {"net.0": "cpu", "net.2": "disk"}
    with pytest.raises(ValueError, match="device_map"):
        FSDPStrategy().setup_module(module)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(state_dict_type="local"), ValueError, "state_dict_type"),
    (dict(auto_wrap_policy=42), TypeError, "auto_wrap_policy"),
    (dict(auto_wrap_policy={int}), TypeError, "auto_wrap_policy"),
    (dict(auto_wrap_policy={nn.Linear}, parallelize_fn=lambda m, mesh: None), ValueError, "parallelize_fn"),
])
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FSDPStrategy(**kwargs)


def test_wrap_targets_skip_tied_modules_and_order_children_first():
    from strategies.fsdp import _policy_matcher, _wrap_targets

    tied = fsdp_jobs.Tied()
    with pytest.warns(UserWarning, match="shared with modules outside"):
        targets = _wrap_targets(tied, _policy_matcher({nn.Embedding, nn.Linear}))
    assert tied.embed not in targets and tied.head not in targets and tied.net[0] in targets
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    targets = _wrap_targets(nested, lambda m: isinstance(m, (nn.Sequential, nn.Linear)))
    assert targets.index(nested[0][0]) < targets.index(nested[0])
