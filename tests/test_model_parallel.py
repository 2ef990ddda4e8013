"""ModelParallelStrategy (FSDP2 x tensor parallel): one real 4-rank gloo job on a 2 x 2 mesh
(tests/distributed/model_parallel_jobs.py), the same checkpoint loaded in one process, argument checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from framework.testing import require_distributed, run_distributed
from strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import model_parallel_jobs as jobs  # noqa: E402

pytestmark = pytest.mark.distributed


@require_distributed
def test_2x2_mesh_equivalence_checkpoints_refusal_and_readme_example(tmp_path):
    from safetensors.torch import load_file

    from framework import Trainer
    from framework.checkpoint import read_manifest
    from framework.checkpoint.consolidate import export_safetensors

    run_distributed(jobs.mesh_job, nproc=4, timeout=600, args=(str(tmp_path),))
    path = str(tmp_path / "mp-step3")
    assert read_manifest(path).layout == "dcp" and read_manifest(path).strategy == "model_parallel"
    assert read_manifest(str(tmp_path / "mp-full")).layout == "full"
    saved = torch.load(tmp_path / "mp-step3.pt")

    # consolidation: one safetensors file that a plain, unparallelised module loads strictly
    export_safetensors(path, str(tmp_path / "model.safetensors"))
    plain = jobs.TPModel()
    plain.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    assert all(torch.equal(plain.state_dict()[k], saved[k]) for k in saved)

    # the 2 x 2 checkpoint on a 1 x 1 mesh in this process (DCP reshards)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    try:
        trainer = Trainer(strategy=strategy, max_steps=3, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False)
        trainer.fit(jobs.TPModel("adamw"), jobs.loader(), ckpt_path=path)
        state = trainer.strategy.module_state_dict()
    finally:
        strategy.destroy_process_group()
    assert trainer.global_step == 3 and all(torch.equal(state[k], saved[k]) for k in saved)


@pytest.mark.parametrize("kwargs, devices, match", [
    (dict(tensor_parallel_size=3), 4, "does not divide the world size 4"),
    (dict(data_parallel_size=2, tensor_parallel_size=4), 4, "does not divide"),
    (dict(data_parallel_size=3), 4, "does not divide"),
])
def test_a_mesh_that_does_not_divide_the_world_size_is_refused(kwargs, devices, match):
    from framework import Trainer

    with pytest.raises(ValueError, match=match):
        Trainer(strategy=ModelParallelStrategy(**kwargs), devices=devices, max_steps=1)


@pytest.mark.parametrize("kwargs, error", [
    (dict(tensor_parallel_size=0), ValueError),
    (dict(data_parallel_size="2"), ValueError),
    (dict(activation_checkpointing_policy=42), TypeError),
])
def test_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        ModelParallelStrategy(**kwargs)


@pytest.mark.parametrize("kwargs, devices, num_nodes, shape", [
    (dict(), 4, 1, (1, 4)),  # both auto: TP within the node, DP across nodes (Lightning's default)
    (dict(), 2, 2, (2, 2)),
    (dict(tensor_parallel_size=2), 4, 1, (2, 2)),
    (dict(data_parallel_size=4), 4, 1, (4, 1)),
])
def test_mesh_shape_from_sizes_and_topology(kwargs, devices, num_nodes, shape):
    strategy = ModelParallelStrategy(devices=devices, num_nodes=num_nodes, **kwargs)
    assert (strategy.data_parallel_size, strategy.tensor_parallel_size) == shape


def test_registered_by_name():
    from strategies import resolve_strategy

    strategy = resolve_strategy("model_parallel", accelerator="cpu", devices=2)
    assert isinstance(strategy, ModelParallelStrategy) and strategy.tensor_parallel_size == 2
