"""Local/fsspec locations and credential redaction (framework/checkpoint/storage.py); whole checkpoints saved,
found, loaded and removed on memory:// and on S3 (a local moto server)."""

from __future__ import annotations

import warnings

import pytest
from checkpoint_samples import TiedNet, save

from framework.checkpoint import (
    MODEL,
    CheckpointError,
    find_last,
    list_checkpoints,
    new_token,
    read_manifest,
    read_state,
    remove_checkpoint,
)
from framework.checkpoint.consolidate import export_safetensors, load_weights
from framework.checkpoint.storage import locate, redact


@pytest.mark.parametrize(("url", "expected"), [
    ("s3://AKIA:s3cr3t@bucket/ckpt", "s3://***@bucket/ckpt"),
    ("s3://AKIA:se/cr+et@bucket/ckpt/x", "s3://***@bucket/ckpt/x"),  # unencoded '/' in the secret
    ("ftp://user:pw@host:21/dir", "ftp://***@host:21/dir"),
    ("https://h/p?X-Amz-Signature=abc&x=1&sig=zz", "https://h/p?X-Amz-Signature=***&x=1&sig=***"),
    ("simplecache::s3://k:s@b/p", "simplecache::s3://***@b/p"),
    ("s3://bucket/dir@v1/x", "s3://bucket/dir@v1/x"),
    ("/local/me@host/ckpt", "/local/me@host/ckpt"),
    ("memory://ckpt", "memory://ckpt"),
])
def test_redact(url, expected):
    assert redact(url) == expected


def test_credentials_go_to_storage_options_not_the_path():
    pytest.importorskip("s3fs")
    loc = locate("s3://AKIA:s3%2Fcret@bucket/ckpt")
    assert "s3%2Fcret" not in loc.path and "s3/cret" not in loc.path and "AKIA" not in loc.path
    assert loc.fs.key == "AKIA" and loc.fs.secret == "s3/cret"
    assert loc.join("manifest.json").url == "s3://AKIA:s3%2Fcret@bucket/ckpt/manifest.json"


@pytest.mark.parametrize("url", ["", 0])
def test_locate_rejects_empty_paths(url):
    with pytest.raises((ValueError, TypeError)):
        locate(url)


def test_file_urls_are_local(tmp_path):
    loc = locate(f"file://{tmp_path}")
    assert loc.is_local and loc.path == str(tmp_path)


# ----------------------------------------------------------------------------- fsspec


def test_memory_url_roundtrip_discovery_and_removal():
    import fsspec

    root = f"memory://kiln-test-{new_token()}"
    try:
        first = save(f"{root}/epoch=0-step=1", step=1)
        second = save(f"{root}/epoch=0-step=2", step=2, safe=False)
        assert find_last(root) == second
        sd = read_state(first, MODEL)
        assert sd["linear1.weight"] is sd["linear2.weight"]
        load_weights(second, TiedNet())
        export_safetensors(first, f"{root}-export/model.safetensors")
        remove_checkpoint(second)
        assert [m.path for m in list_checkpoints(root)] == [first]
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch):
    import fsspec

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": moto_endpoint},
                                                   "key": "testing", "secret": "testing"})
    bucket = f"kiln-{new_token()[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    return bucket


@pytest.mark.timeout(120)
def test_s3_roundtrip_on_local_server(s3_bucket):
    root = f"s3://{s3_bucket}/run/checkpoints"
    first = save(f"{root}/epoch=0-step=1", step=1)
    second = save(f"s3://AKIA:se%2Fcret@{s3_bucket}/run/checkpoints/epoch=0-step=2", step=2)
    assert [m.path for m in list_checkpoints(root)] == [f"{root}/epoch=0-step=2", first]
    fresh = TiedNet()
    load_weights(second, fresh)
    assert fresh.linear1.weight is fresh.linear2.weight
    save(f"{root}/epoch=0-step=1", step=3, safe=False)  # overwrite in place: manifest last
    assert read_manifest(first).global_step == 3 and "model.safetensors" not in read_manifest(first).files
    remove_checkpoint(first)
    assert find_last(root) == f"{root}/epoch=0-step=2"


@pytest.mark.timeout(120)
def test_credentials_never_appear_in_messages(s3_bucket, tmp_path):
    secret = "TOPSECRETVALUE"
    url = f"s3://AKIA:{secret}@{s3_bucket}/nothing/here"
    with pytest.raises(CheckpointError) as info:
        read_manifest(url)
    assert secret not in str(info.value) and "***@" in str(info.value)
    path = save(f"s3://AKIA:{secret}@{s3_bucket}/ck/c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_last(f"s3://AKIA:{secret}@{s3_bucket}/ck") == path
    with pytest.raises(CheckpointError) as info:
        read_state(path, "rank-5")
    assert secret not in str(info.value)
