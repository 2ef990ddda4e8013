"""Asynchronous checkpointing: snapshot the state while training goes on, write it on a background thread.

:meth:`AsyncCheckpointWriter.snapshot` copies every tensor into CPU buffers owned by the writer (kept
and reused across saves, pinned when the source is on an accelerator). Given the ``module`` and
``optimizers`` that own the state, it copies right away only what the next forward pass may change
(buffers such as BatchNorm statistics, and everything that is not a parameter or optimizer state); the
parameters and optimizer state, which change only at an optimizer step, are copied on the writer's
thread while the next forward/backward runs. Every optimizer's ``step`` waits for that copy first
(a step pre-hook), and :meth:`~AsyncCheckpointWriter.wait_for_snapshot` is the call for anything else
that changes weights in place; a thread that must wait copies the tensors the writer's thread has not
reached yet instead of waiting idle (on a machine whose other cores are busy, the writer's thread may
have had little time). The buffers are kept for the next save (one CPU copy of the state held while
the writer lives); :meth:`~AsyncCheckpointWriter.reserve` allocates them ahead, in the background, so that
the first save copies into warm memory and blocks no longer than later ones.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from framework.checkpoint.serialization import tensor_identity

__all__ = ["AsyncCheckpointWriter"]


class AsyncCheckpointWriter:
    """One checkpoint write at a time, in the background; errors surface at the next call.

    Usage: ``snap = writer.snapshot(state, module=m, optimizers=opts); writer.submit(save_checkpoint, path,
    snap, meta)``; the write starts once the snapshot is complete. ``writer.wait()`` (e.g. at the end of
    fit) blocks until the write is done and re-raises its exception. ``snapshot`` and ``submit`` first wait
    for the previous write (its buffers are reused).
    """

    def __init__(self, *, reuse_buffers: bool = True) -> None:
        self.reuse_buffers = reuse_buffers
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._used: dict[tuple, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._copier: threading.Thread | None = None
        self._copy_error: BaseException | None = None
        self._pending: _DeferredCopy | None = None
        self._guards: list[Any] = []
        self._reserver: threading.Thread | None = None
        self._reserved: dict[tuple, torch.Tensor] = {}

    @property
    def busy(self) -> bool:
        """True while a snapshot copy or a submitted write is still running."""
        return any(t is not None and t.is_alive() for t in (self._copier, self._thread))

    def wait_for_snapshot(self) -> None:
        """Block until the last snapshot is complete: call it before changing weights or optimizer state in
        place outside an optimizer step (optimizer steps call it themselves). Cheap when nothing is pending."""
        pending = self._pending
        if pending is not None:
            if not pending.done.is_set():
                pending.work()  # copy what the background thread has not taken yet instead of waiting idle
                pending.done.wait()
            if self._pending is pending:  # the copying thread has nothing left but to return
                self._pending = self._copier = None
        if self._copy_error is not None:
            error, self._copy_error = self._copy_error, None
            raise error

    def _remove_guards(self) -> None:
        for handle in self._guards:  # never from inside a hook: the optimizer is iterating over them
            handle.remove()
        self._guards = []

    def wait(self) -> None:
        """Block until the pending snapshot and write finished; re-raise the write's exception (once)."""
        self.wait_for_snapshot()
        self._remove_guards()
        self._join_write()

    def _join_write(self) -> None:
        """Wait for the running write (if any) and re-raise its exception once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` on a background thread once the previous write finished and the
        last snapshot is complete (without blocking the caller on that snapshot)."""
        self._join_write()
        pending, copier = self._pending, self._copier

        def run() -> None:
            try:
                if pending is not None:
                    pending.done.wait()  # the loop's thread may be copying the last items
                    copier.join()
                    if pending.error is not None:  # incomplete: write nothing (the waiting step raises the cause)
                        raise RuntimeError("the checkpoint was not written: copying its snapshot failed") \
                            from pending.error
                fn(*args, **kwargs)
            except BaseException as exc:  # re-raised on the caller's thread by wait()
                self._error = exc

        # not a daemon: an interpreter exiting mid-write still finishes the checkpoint
        self._thread = threading.Thread(target=run, name="kiln-checkpoint-writer")
        self._thread.start()

    def snapshot(self, state: Any, *, module: torch.nn.Module | None = None,
                 optimizers: Iterable[torch.optim.Optimizer] = ()) -> Any:
        """A copy of ``state`` whose tensors live in CPU buffers owned by this writer.

        Containers are copied now (an optimizer's state_dict shares its inner dicts with the live
        optimizer); tied tensors stay tied. Without ``module``/``optimizers`` every tensor is copied before
        this returns. With ``optimizers``, parameters of ``module`` and tensors in the optimizers' state are copied
        in the background; until that copy completes the snapshot's tensors must not be read (``submit``
        and :meth:`wait_for_snapshot` wait for it) and the optimizers' ``step`` waits for it.
        """
        self.wait()  # the previous write may still be reading the buffers
        if not self.reuse_buffers:
            self._buffers = {}
        optimizers = list(optimizers)
        deferrable = _identities(module, optimizers) if optimizers else set()  # no step to guard: copy all now
        copies: dict[tuple, torch.Tensor] = {}
        devices: set[torch.device] = set()
        deferred: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._used = {}
        with torch.no_grad():
            result = self._copy(state, (), copies, devices, deferrable, deferred)
        _synchronize(devices)
        if deferred:
            self._guards = [o.register_step_pre_hook(lambda *_: self.wait_for_snapshot()) for o in optimizers]
            self._pending = _DeferredCopy(deferred, self._copy_one, self._snapshot_done)
            self._copier = threading.Thread(target=self._copy_deferred, args=(self._pending,),
                                            name="kiln-checkpoint-snapshot", daemon=True)
            self._copier.start()
        else:
            self._buffers, self._used = self._used, {}  # drop buffers of keys that disappeared
        return result

    def reserve(self, *, module: torch.nn.Module | None = None,
                optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Allocate and touch, on a background thread, the buffers a snapshot of ``module``'s parameters and
        buffers and ``optimizers``' state will copy into; returns at once.

        Fresh memory costs page faults as large as the copy itself, so without this the first snapshot's
        copy runs long and the next optimizer step waits for it. Call it once the optimizer state exists
        (after the first optimizer step), ahead of the first save; later saves reuse the buffers anyway.
        """
        sources: list[torch.Tensor] = [*module.parameters(), *module.buffers()] if module is not None else []
        for optimizer in optimizers:
            for per_param in optimizer.state.values():
                sources += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        sources = [t.detach() for t in sources if t.layout == torch.strided and not t.is_meta]
        previous = self._reserver

        def allocate() -> None:
            if previous is not None:
                previous.join()
            made: dict[tuple, torch.Tensor] = {}
            for t in sources:
                key = _key(t)
                if key not in made and key not in self._buffers:
                    made[key] = _new_buffer(t).zero_()  # zero_ faults the pages in now
            self._reserved = made

        self._reserver = threading.Thread(target=allocate, name="kiln-checkpoint-reserve", daemon=True)
        self._reserver.start()

    def close(self) -> None:
        """Wait for the pending snapshot and write, then free the snapshot buffers."""
        try:
            self.wait()
            if self._reserver is not None:
                self._reserver.join()
        finally:
            self._buffers, self._reserved = {}, {}

    def __enter__(self) -> AsyncCheckpointWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- copying ---------------------------------------------------------------------------------
    def _copy_deferred(self, pending: _DeferredCopy) -> None:
        reserver = self._reserver
        if reserver is not None:
            reserver.join()  # its buffers are warm: copying into them beats faulting in fresh ones
        pending.work()

    def _copy_one(self, source: torch.Tensor, placeholder: torch.Tensor, devices: set) -> None:
        buf = self._buffer(source)
        placeholder.set_(buf)  # the snapshot's tensor object now holds the buffer
        self._fill(buf, source, devices)

    def _snapshot_done(self, error: BaseException | None) -> None:
        if error is not None:  # re-raised by wait_for_snapshot()/the write
            self._copy_error = error
        else:
            self._buffers, self._used, self._reserved = self._used, {}, {}

    def _buffer(self, t: torch.Tensor) -> torch.Tensor:
        """The buffer for source tensor ``t``: last snapshot's (same source), a reserved one, or a new one."""
        key = _key(t)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            reserver = self._reserver
            reserved = self._reserved if reserver is None or not reserver.is_alive() else {}
            buf = reserved.pop(key, None)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = _new_buffer(t)
        self._used[key] = buf
        return buf

    @staticmethod
    def _fill(buf: torch.Tensor, source: torch.Tensor, devices: set) -> None:
        non_blocking = source.device.type != "cpu" and buf.is_pinned()
        buf.copy_(source, non_blocking=non_blocking)
        if non_blocking:
            devices.add(source.device)

    def _copy(self, obj: Any, path: tuple, copies: dict, devices: set, deferrable: set, deferred: list) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.is_meta or type(obj) not in (torch.Tensor, torch.nn.Parameter):
                return obj  # not copyable here; flatten_state reports it with its key path
            ident = tensor_identity(obj)
            if ident is not None and ident in copies:
                return copies[ident]
            if ident is not None and ident in deferrable:
                out = torch.empty(0, dtype=obj.dtype)  # the copier points it at its filled buffer (set_)
                deferred.append((obj, out))
            else:
                out = self._buffer(obj)
                self._fill(out, obj, devices)
            if ident is not None:
                copies[ident] = out
            return out
        if isinstance(obj, dict):
            items = [(k, self._copy(v, (*path, k), copies, devices, deferrable, deferred)) for k, v in obj.items()]
            if isinstance(obj, OrderedDict):
                out = OrderedDict(items)
                if isinstance(getattr(obj, "_metadata", None), dict):
                    out._metadata = self._copy(obj._metadata, (*path, "_metadata"), copies, devices, deferrable,
                                               deferred)
                return out
            return dict(items)
        if type(obj) is list:
            return [self._copy(v, (*path, i), copies, devices, deferrable, deferred) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return tuple(self._copy(v, (*path, i), copies, devices, deferrable, deferred) for i, v in enumerate(obj))
        if type(obj).__module__ == "numpy" and hasattr(obj, "copy"):
            return obj.copy()
        return obj  # immutable leaves; anything else is rejected later by flatten_state


class _DeferredCopy:
    """The part of a snapshot copied after ``snapshot`` returns, one tensor at a time: by the writer's background
    thread and, once the training loop must wait for it (an optimizer step), by the loop's thread as well."""

    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor]],
                 copy_one: Callable[[torch.Tensor, torch.Tensor, set], None],
                 finish: Callable[[BaseException | None], None]) -> None:
        self.items, self._copy_one, self._finish = items, copy_one, finish
        self._next = itertools.count()  # hands each item to exactly one thread
        self._left = len(items)
        self._lock = threading.Lock()
        self.error: BaseException | None = None  # the first failure: the snapshot is incomplete
        self.done = threading.Event()

    def work(self) -> None:
        """Copy the items no thread has taken yet; whoever completes the last one (or fails) finishes."""
        devices: set[torch.device] = set()
        copied = 0
        try:
            with torch.no_grad():
                for index in self._next:
                    if index >= len(self.items) or self.error is not None:
                        break
                    self._copy_one(*self.items[index], devices)
                    copied += 1
            _synchronize(devices)
        except BaseException as exc:
            with self._lock:
                first = self.error is None
                if first:
                    self.error = exc
            if first:  # the snapshot stays incomplete; nobody waits for the rest
                self._finish(exc)
                self.done.set()
            return
        with self._lock:
            self._left -= copied
            last = self._left == 0 and self.error is None
        if last:
            self._finish(None)
            self.done.set()


def _key(t: torch.Tensor) -> tuple:
    """Buffers are keyed by the memory they copy (a parameter keeps its memory from save to save)."""
    return tensor_identity(t) or (t.dtype, tuple(t.shape))


def _new_buffer(t: torch.Tensor) -> torch.Tensor:
    pin = t.device.type != "cpu" and torch.cuda.is_available()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)


def _identities(module: torch.nn.Module | None, optimizers: list[torch.optim.Optimizer]) -> set[tuple]:
    """Identities of the tensors that change only at an optimizer step: parameters and optimizer state."""
    found: set[tuple] = set()
    tensors: list[torch.Tensor] = list(module.parameters()) if module is not None else []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            tensors += [p for p in group["params"] if isinstance(p, torch.Tensor)]
        for per_param in optimizer.state.values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        ident = tensor_identity(t.detach())
        if ident is not None:
            found.add(ident)
    return found


def _synchronize(devices: set[torch.device]) -> None:
    for device in devices:
        torch.accelerator.synchronize(device) if hasattr(torch, "accelerator") else torch.cuda.synchronize(device)
