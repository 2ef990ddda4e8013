"""Model weights out of any checkpoint layout (framework/checkpoint/consolidate.py)."""

from __future__ import annotations

import os

import pytest
import torch
from checkpoint_samples import TiedNet

from framework.checkpoint import (
    MODEL,
    CheckpointError,
    begin_checkpoint,
    commit_checkpoint,
    describe_files,
    save_checkpoint,
)
from framework.checkpoint.consolidate import DCP_DIR, export_safetensors, load_weights, read_model_state


def trained(seed: int) -> TiedNet:
    torch.manual_seed(seed)
    model = TiedNet()
    with torch.no_grad():
        model.norm.running_mean.add_(seed)
    return model


def save(path, step=3, safe=True):
    return save_checkpoint(str(path), {MODEL: trained(step).state_dict()}, {"global_step": step},
                           safe_serialization=safe)


def flip_byte(path, rel):
    file = os.path.join(path, rel)
    data = bytearray(open(file, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(file, "wb").write(data)


def test_export_safetensors_is_self_contained(tmp_path):
    from safetensors.torch import load_file

    path = save(tmp_path / "c", safe=False)
    out = export_safetensors(path, str(tmp_path / "model.safetensors"))
    loaded = load_file(out)
    fresh = TiedNet()
    fresh.load_state_dict(loaded, strict=True)
    assert fresh.linear1.weight is fresh.linear2.weight
    assert torch.equal(fresh.linear1.weight, trained(3).linear1.weight)


def test_load_weights_is_strict_by_default(tmp_path):
    path = save(tmp_path / "c")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_weights(path, torch.nn.Linear(4, 4))
    assert load_weights(path, torch.nn.Linear(4, 4), strict=False).unexpected_keys


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_layout_is_read_through_the_model_hook(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = trained(0)
    staging = begin_checkpoint(str(tmp_path / "sharded"))
    dcp.save({"model": model.state_dict()}, checkpoint_id=os.path.join(staging.dir, DCP_DIR))
    rels = [f"{DCP_DIR}/{f}" for f in os.listdir(os.path.join(staging.dir, DCP_DIR))]
    path = commit_checkpoint(staging, describe_files(staging, rels), layout="dcp", world_size=2, strategy="fsdp")
    fresh = TiedNet()
    load_weights(path, fresh)
    assert torch.equal(fresh.linear1.weight, model.linear1.weight)
    flip_byte(path, rels[0])
    with pytest.raises(CheckpointError, match=rels[0]):
        load_weights(path, fresh)




def test_unknown_layout_asks_to_upgrade(tmp_path):
    staging = begin_checkpoint(str(tmp_path / "c"))
    path = commit_checkpoint(staging, [], layout="future-layout")
    with pytest.raises(CheckpointError, match="layout 'future-layout'.*upgrade"):
        read_model_state(path)


def test_export_to_a_url(tmp_path):
    import fsspec

    path = save(tmp_path / "c")
    export_safetensors(path, "memory://kiln-export-test/model.safetensors")
    fs = fsspec.filesystem("memory")
    try:
        from safetensors.torch import load

        assert set(load(fs.cat_file("/kiln-export-test/model.safetensors"))) == set(TiedNet().state_dict())
    finally:
        fs.rm("/kiln-export-test", recursive=True)
