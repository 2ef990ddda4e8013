"""Asynchronous checkpointing: snapshot state on the caller's thread, write it on a background one.

Only :meth:`AsyncCheckpointWriter.snapshot` blocks training: it copies every tensor into CPU
buffers that are kept and reused across saves (pinned when the source is on an accelerator, so
device->host copies run asynchronously and finish with one synchronize). Reusing the buffers
avoids allocating and page-faulting the whole state on every save; the price is one CPU copy of
the state held while the writer lives (``close()`` frees it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from framework.checkpoint.serialization import tensor_identity

__all__ = ["AsyncCheckpointWriter"]


class AsyncCheckpointWriter:
    """One checkpoint write at a time, in the background; errors surface at the next call.

    Usage: ``snap = writer.snapshot(state); writer.submit(save_checkpoint, path, snap, meta)``;
    ``writer.wait()`` (e.g. at the end of fit) blocks until the write is done and re-raises its
    exception. ``snapshot`` and ``submit`` first wait for the previous write (its buffers are reused).
    """

    def __init__(self, *, reuse_buffers: bool = True) -> None:
        self.reuse_buffers = reuse_buffers
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._used: dict[tuple, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """True while a submitted write is still running."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the pending write finished; re-raise its exception (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` on a background thread, after the previous write finished."""
        self.wait()

        def run() -> None:
            try:
                fn(*args, **kwargs)
            except BaseException as exc:  # re-raised on the caller's thread by wait()
                self._error = exc

        # not a daemon: an interpreter exiting mid-write still finishes the checkpoint
        self._thread = threading.Thread(target=run, name="kiln-checkpoint-writer")
        self._thread.start()

    def snapshot(self, state: Any) -> Any:
        """A copy of ``state`` whose tensors live in CPU buffers owned by this writer.

        Containers are copied too (an optimizer's state_dict shares its inner dicts with the
        live optimizer); tied tensors stay tied. Blocks until all device->host copies are done.
        """
        if self.reuse_buffers:
            self.wait()  # the previous write may still be reading the buffers
        else:
            self._buffers = {}
        copies: dict[tuple, torch.Tensor] = {}
        devices: set[torch.device] = set()
        self._used: dict[tuple, torch.Tensor] = {}
        with torch.no_grad():
            result = self._copy(state, (), copies, devices)
        self._buffers, self._used = self._used, {}  # drop buffers of keys that disappeared
        for device in devices:
            torch.accelerator.synchronize(device) if hasattr(torch, "accelerator") else torch.cuda.synchronize(device)
        return result

    def close(self) -> None:
        """Wait for the pending write and free the snapshot buffers."""
        try:
            self.wait()
        finally:
            self._buffers = {}

    def __enter__(self) -> AsyncCheckpointWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _buffer(self, path: tuple, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.device.type != "cpu" and torch.cuda.is_available()
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        self._used[path] = buf
        return buf

    def _copy(self, obj: Any, path: tuple, copies: dict, devices: set) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.is_meta or type(obj) not in (torch.Tensor, torch.nn.Parameter):
                return obj  # not copyable here; flatten_state reports it with its key path
            ident = tensor_identity(obj)
            if ident is not None and ident in copies:
                return copies[ident]
            buf = self._buffer(path, obj)
            non_blocking = obj.device.type != "cpu" and buf.is_pinned()
            buf.copy_(obj, non_blocking=non_blocking)
            if non_blocking:
                devices.add(obj.device)
            if ident is not None:
                copies[ident] = buf
            return buf
        if isinstance(obj, dict):
            items = [(k, self._copy(v, (*path, k), copies, devices)) for k, v in obj.items()]
            if isinstance(obj, OrderedDict):
                out = OrderedDict(items)
                if isinstance(getattr(obj, "_metadata", None), dict):
                    out._metadata = self._copy(obj._metadata, (*path, "_metadata"), copies, devices)
                return out
            return dict(items)
        if type(obj) is list:
            return [self._copy(v, (*path, i), copies, devices) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return tuple(self._copy(v, (*path, i), copies, devices) for i, v in enumerate(obj))
        if type(obj).__module__ == "numpy" and hasattr(obj, "copy"):
            return obj.copy()
        return obj  # immutable leaves; anything else is rejected later by flatten_state
