"""Local/fsspec locations and credential redaction (framework/checkpoint/storage.py)."""

from __future__ import annotations

import pytest

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
