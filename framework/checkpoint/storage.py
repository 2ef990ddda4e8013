"""Where checkpoints live: local paths through os (fast), anything with a protocol through fsspec.

Credentials embedded in a URL (``s3://key:secret@bucket/...``) are taken out of the path before
fsspec sees it and passed as storage options instead, so no fsspec/boto error can echo them;
:func:`redact` removes them from every message Kiln writes. fsspec is imported only for URLs.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import unquote

_SENSITIVE_QUERY = re.compile(r"(sig|signature|token|key|secret|password|passwd|credential|auth)", re.I)


def _split_userinfo(url: str) -> tuple[str, str | None]:
    """``scheme://[userinfo@]rest`` -> (``scheme://rest``, userinfo or None)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, None
    netloc = rest.split("/", 1)[0]
    if "@" in netloc:
        at = netloc.rfind("@")
    elif "@" in rest and ":" in rest[: rest.rfind("@")]:  # an unencoded "/" inside the secret
        at = rest.rfind("@")
    else:
        return url, None
    return f"{scheme}://{rest[at + 1:]}", rest[:at]


def redact(url: Any) -> str:
    """``url`` with credentials (userinfo, signed-URL query values) replaced by ``***``."""
    parts = []
    for part in str(url).split("::"):
        clean, userinfo = _split_userinfo(part)
        if userinfo is not None:
            scheme, _, rest = clean.partition("://")
            clean = f"{scheme}://***@{rest}"
        base, q, query = clean.partition("?")
        if q:
            params = [p.partition("=") for p in query.split("&")]
            query = "&".join(k + eq + ("***" if eq and _SENSITIVE_QUERY.search(k) else v) for k, eq, v in params)
        parts.append(base + q + query)
    return "::".join(parts)


def join_path(base: str, *parts: str) -> str:
    """``base`` joined with ``parts`` (empty parts skipped): ``/`` for URLs, ``os.path.join`` for local paths."""
    parts = tuple(p for p in parts if p)
    if "://" in base and not base.startswith("file://"):
        return "/".join((base.rstrip("/"), *parts))
    return os.path.join(base, *parts)


def url_to_fs(url: str) -> tuple[Any, str]:
    """fsspec's ``(filesystem, path)`` for ``url``, credentials in it passed as storage options (for other
    modules that write to URLs, e.g. loggers: the credentials then never reach a path or a message)."""
    return _remote(url)


def _remote(url: str) -> tuple[Any, str]:
    import fsspec

    if "::" in url:
        return fsspec.core.url_to_fs(url)
    clean, userinfo = _split_userinfo(url)
    options: dict[str, str] = {}
    if userinfo is not None:
        user, _, password = userinfo.partition(":")
        if clean.split("://", 1)[0] in ("s3", "s3a"):
            options = {"key": unquote(user), "secret": unquote(password)}
        else:
            options = {"username": unquote(user), "password": unquote(password)}
    return fsspec.core.url_to_fs(clean, **options)


@dataclass(frozen=True)
class Location:
    """A file or directory: ``url`` as the user wrote it, ``path`` as os/fsspec wants it."""

    url: str
    path: str
    fs: Any = None  # None: local

    @property
    def is_local(self) -> bool:
        return self.fs is None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1] if self.fs else os.path.basename(self.path.rstrip(os.sep))

    def join(self, rel: str) -> Location:
        if self.fs is None:
            path = os.path.join(self.path, *rel.split("/"))
            return Location(path, path)
        return Location(self.url.rstrip("/") + "/" + rel, self.path.rstrip("/") + "/" + rel, self.fs)

    def child_url(self, name: str) -> str:
        return self.join(name).url

    def sibling(self, name: str) -> Location:
        """Local only: ``name`` in the same parent directory."""
        path = os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
        return Location(path, path)

    def open(self, mode: str) -> IO[bytes]:
        return open(self.path, mode) if self.fs is None else self.fs.open(self.path, mode)

    def size_of_open(self, f: Any) -> int:
        if self.fs is None:
            return os.fstat(f.fileno()).st_size
        size = getattr(f, "size", None)
        return int(size) if isinstance(size, int) else int(self.fs.size(self.path))

    def read_bytes(self) -> bytes:
        if self.fs is None:
            with open(self.path, "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path)

    def exists(self) -> bool:
        return os.path.exists(self.path) if self.fs is None else self.fs.exists(self.path)

    def makedirs(self) -> None:
        if self.fs is None:
            os.makedirs(self.path, exist_ok=True)
        else:
            self.fs.makedirs(self.path, exist_ok=True)

    def remove_file(self, missing_ok: bool = False) -> None:
        try:
            os.remove(self.path) if self.fs is None else self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove_tree(self) -> None:
        if self.fs is None:
            if os.path.islink(self.path):  # a link is removed, never what it points to
                os.unlink(self.path)
                return
            if os.path.exists(self.path):
                if sys.version_info >= (3, 12):
                    shutil.rmtree(self.path, onexc=lambda f, p, exc: _ignore_vanished(f, p, (type(exc), exc, None)))
                else:
                    shutil.rmtree(self.path, onerror=_ignore_vanished)
        elif self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def file_sizes(self) -> dict[str, int]:
        """Relative '/'-separated path -> size of every file below this directory."""
        if self.fs is None:
            sizes = {}
            for dirpath, _, files in os.walk(self.path):
                for name in files:
                    full = os.path.join(dirpath, name)
                    st = os.stat(full)
                    if stat.S_ISREG(st.st_mode):  # a FIFO or device is not a file a checkpoint can hold
                        sizes[os.path.relpath(full, self.path).replace(os.sep, "/")] = st.st_size
            return sizes
        self.fs.invalidate_cache(self.path)
        try:
            found = self.fs.find(self.path, detail=True)
        except FileNotFoundError:
            return {}
        root = self.fs._strip_protocol(self.path).rstrip("/") + "/"
        return {name[len(root):]: int(info["size"]) for name, info in found.items()
                if info.get("type") != "directory" and name.startswith(root)}

    def child_dirs(self) -> list[str]:
        """Names of the non-hidden directories directly below this one ([] if it does not exist)."""
        if self.fs is None:
            try:
                with os.scandir(self.path) as it:
                    return [e.name for e in it if not e.name.startswith(".") and e.is_dir()]
            except FileNotFoundError:
                return []
        self.fs.invalidate_cache(self.path)
        try:
            listing = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return []
        names = [info["name"].rstrip("/").rsplit("/", 1)[-1] for info in listing if info.get("type") == "directory"]
        return [n for n in names if not n.startswith(".")]

    def hidden_dirs(self) -> list[tuple[str, float]]:
        """(name, mtime) of hidden local directories below this one (staging dirs)."""
        if self.fs is not None:
            return []
        try:
            with os.scandir(self.path) as it:
                return [(e.name, e.stat().st_mtime) for e in it
                        if e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def replace_with(self, staging: Location, token: str, fsync: bool = False) -> None:
        """Local only: atomically rename ``staging`` to this path, replacing what is there."""
        if os.path.exists(self.path):
            aside = self.sibling(f".{self.name}.old-{token}")
            os.rename(self.path, aside.path)
            os.rename(staging.path, self.path)
            shutil.rmtree(aside.path, ignore_errors=True)
        else:
            os.rename(staging.path, self.path)
        if fsync:
            fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _ignore_vanished(function: Any, path: str, exc_info: Any) -> None:
    """rmtree error handler: a file already gone was removed by another process cleaning up too."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def locate(url: str | os.PathLike) -> Location:
    """A :class:`Location` for a local path, ``file://`` URL, or any fsspec URL."""
    url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise ValueError(f"path={url!r} must be a non-empty local path or fsspec URL")
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" not in url:
        return Location(url, url)
    fs, path = _remote(url)
    return Location(url, path, fs)
