"""Checkpoint directories: commit, verified load, integrity, staging and rank hand-over (framework/checkpoint/).

Discovery and removal: tests/test_checkpoint_discovery.py; fsspec/S3 locations: tests/test_checkpoint_storage.py.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from checkpoint_samples import TiedNet, damage, save, states, trained

from framework import checkpoint as ckpt
from framework.checkpoint import (
    MANIFEST,
    MODEL,
    TRAINER,
    CheckpointError,
    begin_checkpoint,
    commit_checkpoint,
    find_last,
    new_token,
    rank_state_name,
    read_manifest,
    read_state,
    save_checkpoint,
    write_state,
)
from framework.checkpoint.consolidate import load_weights
from framework.checkpoint.format import manifest_checksum


def rewrite_manifest(path, edit):
    """Edit a manifest and re-sign it, as an attacker who can write files could."""
    file = os.path.join(path, MANIFEST)
    doc = json.load(open(file))
    doc.pop("checksum")
    edit(doc)
    doc["checksum"] = manifest_checksum(doc, "xxh3_64")
    json.dump(doc, open(file, "w"))


@pytest.mark.parametrize("safe", [True, False])
def test_full_trainer_state_roundtrip_resumes_identically(tmp_path, safe):
    model, opt, sched = trained()
    saved = states(model, opt, sched)
    path = save_checkpoint(str(tmp_path / "c"), saved, {"global_step": 3}, safe_serialization=safe)
    exts = [".json", ".safetensors"] if safe else [".pt"]
    assert sorted(os.listdir(path)) == sorted([MANIFEST] + [n + e for n in (MODEL, TRAINER, "rank-0") for e in exts])
    manifest = read_manifest(path)
    assert manifest.state_names() == [MODEL, "rank-0", TRAINER] and manifest.world_size == 1

    model2, opt2, sched2 = trained(seed=99)
    load_weights(path, model2)
    trainer = read_state(path, TRAINER, manifest)
    opt2.load_state_dict(trainer["optimizers"][0])
    sched2.load_state_dict(trainer["schedulers"][0])
    assert trainer["callbacks"]["ModelCheckpoint{'monitor': None}"] == {"best": float("inf"), "kept": ("a", "b")}
    rank = read_state(path, "rank-0", manifest)
    random.setstate(rank["python"])
    np.random.set_state(rank["numpy"])
    torch.set_rng_state(rank["torch"])
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        torch.manual_seed(5)
        m(torch.randn(8, 4)).pow(2).mean().backward()
        o.step()
        s.step()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoints_load_whatever_format_they_were_saved_in(tmp_path):
    """Mixed formats in one checkpoint: the reader picks by file, not by a setting."""
    model, opt, sched = trained()
    staging = begin_checkpoint(str(tmp_path / "mixed"))
    entries = write_state(staging, MODEL, model.state_dict(), safe_serialization=False)
    entries += write_state(staging, TRAINER, {"optimizers": [opt.state_dict()]}, safe_serialization=True)
    path = commit_checkpoint(staging, entries, {"global_step": 1})
    assert sorted(os.listdir(path)) == [MANIFEST, "model.pt", "trainer.json", "trainer.safetensors"]
    sd = read_state(path, MODEL)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    torch.optim.Adam(model.parameters()).load_state_dict(read_state(path, TRAINER)["optimizers"][0])


@pytest.mark.parametrize("safe", [True, False])
def test_tied_weights_stored_once_and_stay_tied(tmp_path, safe):
    path = save(tmp_path / "tied", safe=safe)
    sd = read_state(path, MODEL)
    assert sd["linear1.weight"] is sd["linear2.weight"]
    if safe:
        from safetensors import safe_open

        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            assert "linear1.weight" in f.keys() and "linear2.weight" not in f.keys()
    fresh = TiedNet()
    load_weights(path, fresh)
    assert fresh.linear2.weight is fresh.linear1.weight
    assert torch.equal(fresh.linear1.weight, trained(3)[0].linear1.weight)


@pytest.mark.parametrize(("rel", "how"), [
    ("model.safetensors", "flip"), ("model.json", "flip"), ("trainer.safetensors", "flip"),
    ("model.safetensors", "truncate"), ("rank-0.json", "truncate"),
])
def test_damaged_file_raises_checkpointerror_naming_checkpoint_and_file(tmp_path, rel, how):
    path = save(tmp_path / "epoch=1-step=3")
    damage(path, rel, how)
    name = rel.rsplit(".", 1)[0]
    with pytest.raises(CheckpointError) as info:
        read_state(path, name)
    assert rel in str(info.value) and "epoch=1-step=3" in str(info.value)
    assert ("bytes" in str(info.value)) == (how == "truncate")


def test_flipped_byte_in_pt_file_detected(tmp_path):
    path = save(tmp_path / "c", safe=False)
    damage(path, "model.pt", "flip")
    with pytest.raises(CheckpointError, match="model.pt is damaged"):
        load_weights(path, TiedNet())


def test_verify_false_skips_checksum_but_not_size(tmp_path):
    path = save(tmp_path / "c")
    damage(path, "trainer.safetensors", "flip-last")
    read_state(path, TRAINER, verify=False)
    with pytest.raises(CheckpointError, match="checksum"):
        read_state(path, TRAINER)
    damage(path, "trainer.safetensors", "truncate")
    with pytest.raises(CheckpointError, match="trainer.safetensors"):
        read_state(path, TRAINER, verify=False)


def test_edited_manifest_is_rejected_by_its_own_checksum(tmp_path):
    path = save(tmp_path / "c")
    file = os.path.join(path, MANIFEST)
    text = open(file).read()
    assert '"global_step": 3' in text
    open(file, "w").write(text.replace('"global_step": 3', '"global_step": 4'))
    with pytest.raises(CheckpointError, match="manifest.json is invalid.*checksum"):
        read_manifest(path)


@pytest.mark.parametrize("evil", ["../outside.json", "/etc/passwd", "a/../../x", "C:/x", "a\\..\\x", "./x", ""])
def test_path_traversal_in_manifest_rejected(tmp_path, evil):
    path = save(tmp_path / "c")
    rewrite_manifest(path, lambda doc: doc["files"].append({"path": evil, "size": 1, "checksum": "crc32:0"}))
    with pytest.raises(CheckpointError, match="unsafe"):
        read_manifest(path)


def test_manifest_from_newer_kiln_asks_to_upgrade(tmp_path):
    path = save(tmp_path / "c")
    rewrite_manifest(path, lambda doc: doc.update(format_version=99))
    with pytest.raises(CheckpointError, match="upgrade"):
        read_manifest(path)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("verify", [True, False])
def test_malicious_pickle_in_checkpoint_is_never_executed(tmp_path, verify):
    path = save(tmp_path / "c", safe=False)
    marker = tmp_path / "pwned"
    torch.save({"linear1.weight": _Exploit(str(marker))}, os.path.join(path, "model.pt"))
    size = os.path.getsize(os.path.join(path, "model.pt"))
    digest = ckpt.describe_files(ckpt.Staging(path, path, "x"), ["model.pt"])[0]["checksum"]

    def swap(doc):
        for e in doc["files"]:
            if e["path"] == "model.pt":
                e.update(size=size, checksum=digest)

    rewrite_manifest(path, swap)
    with pytest.raises(CheckpointError, match="model.pt.*refusing to unpickle"):
        load_weights(path, TiedNet(), verify=verify)
    assert not marker.exists()


def test_staging_is_invisible_until_commit_and_multi_rank_entries_merge(tmp_path):
    target = str(tmp_path / "epoch=0-step=4")
    token = new_token()
    ranks = [begin_checkpoint(target, token) for _ in range(2)]  # each rank, same token
    assert ranks[0].dir == ranks[1].dir and os.path.basename(ranks[0].dir).startswith(".epoch=0-step=4.tmp-")
    gathered = []
    for r, staging in enumerate(ranks):
        gathered += write_state(staging, rank_state_name(r), {"rng": torch.get_rng_state(), "rank": r})
    gathered += write_state(ranks[0], MODEL, TiedNet().state_dict())
    assert find_last(str(tmp_path)) is None
    with pytest.raises(CheckpointError, match="did every rank finish"):
        commit_checkpoint(ranks[0], [{**gathered[0], "size": 1}, *gathered[1:]], world_size=2)
    (tmp_path / os.path.basename(ranks[0].dir) / "rank-7.json").write_text("stale leftover")
    json.loads(json.dumps(gathered))  # entries are plain JSON, fit for gather_object
    path = commit_checkpoint(ranks[0], gathered, {"global_step": 4}, world_size=2, strategy="ddp")
    assert find_last(str(tmp_path)) == path and not os.path.exists(ranks[0].dir)
    manifest = read_manifest(path)
    assert (manifest.world_size, manifest.strategy, manifest.global_step) == (2, "ddp", 4)
    assert manifest.state_names() == [MODEL, "rank-0", "rank-1"] and "rank-7.json" not in os.listdir(path)
    assert read_state(path, "rank-1")["rank"] == 1


def test_commit_replaces_an_existing_checkpoint(tmp_path):
    first = save(tmp_path / "last", step=1)
    save(tmp_path / "last", step=2, safe=False)
    assert read_manifest(first).global_step == 2 and sorted(os.listdir(first)) == [MANIFEST, "model.pt", "rank-0.pt", "trainer.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_metadata_is_made_json_and_bad_values_are_refused(tmp_path):
    path = save_checkpoint(str(tmp_path / "c"), {MODEL: {}}, {"val_loss": torch.tensor(0.5), "np": np.float32(2)})
    assert read_manifest(path).metadata == {"val_loss": 0.5, "np": 2.0}
    with pytest.raises(TypeError, match="metadata\\['obj'\\]"):
        save_checkpoint(str(tmp_path / "d"), {MODEL: {}}, {"obj": object()})


@pytest.mark.parametrize(("call", "match"), [
    (lambda p: begin_checkpoint(p, token="../x"), "token="),
    (lambda p: begin_checkpoint(os.path.join(p, ".hidden")), "path="),
    (lambda p: write_state(begin_checkpoint(p), "a/b", {}), "name="),
    (lambda p: write_state(begin_checkpoint(p), "manifest", {}), "name="),
])
def test_bad_arguments_raise_valueerror_naming_them(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(str(tmp_path / "c"))


def test_unknown_state_name_lists_what_exists(tmp_path):
    path = save(tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"no state 'rank-1'.*\['model', 'rank-0', 'trainer'\]"):
        read_state(path, "rank-1")


def test_unsupported_object_in_state_names_key_path(tmp_path):
    with pytest.raises(TypeError, match=r"state\['callbacks'\]\['cb'\]"):
        save_checkpoint(str(tmp_path / "c"), {TRAINER: {"callbacks": {"cb": object()}}})


def test_durable_save_with_fsync(tmp_path):
    path = save(tmp_path / "durable", fsync=True)
    assert read_manifest(path).global_step == 3 and read_state(path, "rank-0")["data"]["position"] == 16


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["local", "memory"])
def test_exchange_entries_hands_files_to_rank0_without_collectives(tmp_path, where):
    import threading

    root = str(tmp_path) if where == "local" else f"memory://kiln-exchange-{new_token()}"
    target, token, world = f"{root}/epoch=0-step=2", new_token(), 3
    results: dict[int, object] = {}

    def rank_main(rank: int) -> None:  # what each rank's background writer thread does
        staging = begin_checkpoint(target, token)
        entries = write_state(staging, rank_state_name(rank), {"rank": rank})
        merged = ckpt.exchange_entries(staging, entries, rank=rank, world_size=world)
        if rank == 0:
            commit_checkpoint(staging, merged, {"global_step": 2}, world_size=world)
        results[rank] = merged

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (2, 0, 1)]  # rank 0 waits for later ranks
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[1] is None and results[2] is None and len(results[0]) == 2 * world
    manifest = read_manifest(target)
    assert manifest.state_names() == ["rank-0", "rank-1", "rank-2"] and manifest.world_size == world
    assert set(manifest.files) == set(ckpt.locate(target).file_sizes()) - {MANIFEST}  # sidecars are gone
    assert read_state(target, "rank-2")["rank"] == 2


def test_exchange_entries_times_out_naming_the_missing_rank(tmp_path):
    staging = begin_checkpoint(str(tmp_path / "c"))
    entries = write_state(staging, rank_state_name(0), {})
    with pytest.raises(CheckpointError, match="rank 1 did not hand over"):
        ckpt.exchange_entries(staging, entries, rank=0, world_size=2, timeout_s=0.2)
