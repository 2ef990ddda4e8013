"""Guards that turn the classic mistakes of distributed training into clear errors or warnings.

1. A collective called on some ranks only, e.g. ``trainer.save_checkpoint()`` under
   ``if trainer.is_global_zero:``. :func:`check_collective_call` makes every rank agree, through the
   process group's key-value store, that it entered the same call before any collective runs. A rank
   left alone raises after a timeout naming the ranks that never came, instead of hanging or pairing
   its collectives with another rank's gradient all-reduce (which corrupts or deadlocks).
2. The model moved (``.to(device)``, ``.double()``, ``.half()``) after the Trainer placed or wrapped it.
   :class:`FitGuard` compares one parameter's identity, device and dtype before every training batch
   (attribute reads: no host sync), and every parameter at fit and epoch start and when a step fails.
3. An optimizer holding tensors that are not the module's parameters (built in ``__init__`` before the
   strategy replaced them, or from another copy of the model): :func:`check_optimizer_params`.
4. ``optimizer.step()`` called by hand under automatic optimization (the Trainer steps too, so the
   update is applied twice and accumulation/precision are bypassed): :class:`FitGuard` warns once.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from framework.trainer import Trainer

TIMEOUT_ENV = "KILN_COLLECTIVE_TIMEOUT"
_WARN_AFTER_S = 60.0
_DEFAULT_TIMEOUT_S = 1800.0
# Calls made through each store so far: identical on every rank as long as the ranks make the same calls.
_call_numbers: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


class CollectiveCallError(RuntimeError):
    """Ranks did not all enter the same collective call (a rank-0-only save, or different arguments)."""


class PlacementError(RuntimeError):
    """The module's parameters changed device, dtype or identity after the Trainer set them up."""


# ---- 1. collectives called on every rank --------------------------------------------------------------
def check_collective_call(strategy: Any, call: str, *, timeout: float | None = None, store: Any = None) -> None:
    """Wait until every rank has entered ``call`` (e.g. ``"trainer.save_checkpoint('ckpt') at step 3"``).

    Raises :class:`CollectiveCallError` on every rank when the ranks describe their calls differently,
    and on the waiting ranks when some rank has not arrived within ``timeout`` seconds (default: the
    ``KILN_COLLECTIVE_TIMEOUT`` environment variable, else the strategy's process-group timeout). A note
    is printed after a minute of waiting so that a stuck job explains itself early. ``store``: the
    key-value store to meet in (default: the default process group's). One process: no-op.
    """
    if strategy.world_size <= 1:
        return
    store = _default_store() if store is None else store
    if store is None:  # no torch.distributed group (e.g. XLA's own runtime): nothing to rendezvous through
        return
    rank, world = strategy.global_rank, strategy.world_size
    timeout = _timeout(strategy) if timeout is None else float(timeout)
    number = _call_numbers[store] = _call_numbers.get(store, -1) + 1
    key = f"kiln/collective/{number}"
    first = store.compare_set(f"{key}/call", "", call).decode()  # the first rank to arrive sets it
    store.set(f"{key}/rank/{rank}", call)
    store.add(f"{key}/mismatch", int(first != call))  # recorded before this rank counts as arrived
    if store.add(f"{key}/arrived", 1) == world:
        store.set(f"{key}/done", "1")
    _wait_for_everyone(store, key, call, rank, world, timeout)
    if store.add(f"{key}/mismatch", 0):
        calls = {r: _get(store, f"{key}/rank/{r}") for r in range(world)}
        listed = "\n".join(f"  rank {r}: {c}" for r, c in calls.items())
        raise CollectiveCallError(
            f"The ranks entered different collective calls:\n{listed}\nEvery rank must make the same call at the "
            "same point with the same arguments (e.g. one checkpoint path for all ranks: Kiln decides which rank "
            "writes what).")


def _wait_for_everyone(store: Any, key: str, call: str, rank: int, world: int, timeout: float) -> None:
    done = [f"{key}/done"]
    waited = 0.0
    for chunk in ((min(_WARN_AFTER_S, timeout), timeout - _WARN_AFTER_S) if timeout > _WARN_AFTER_S
                  else (timeout,)):
        try:
            store.wait(done, timedelta(seconds=chunk))
            return
        except RuntimeError:  # DistStoreError: not everyone arrived in time (or the store is gone)
            waited += chunk
            missing = _missing_ranks(store, key, world)
            if waited < timeout:
                warnings.warn(f"rank {rank} has waited {waited:g} s in {call} for rank(s) {missing}. " + _HINT,
                              stacklevel=4)
    raise CollectiveCallError(
        f"{call} is collective, but rank(s) {_missing_ranks(store, key, world)} did not call it within "
        f"{timeout:g} s while rank {rank} did. " + _HINT + f" If ranks legitimately arrive this far apart, set "
        f"{TIMEOUT_ENV}=<seconds>.") from None


_HINT = ("Call it on every rank, not under `if trainer.is_global_zero:` (Kiln already makes only the right ranks "
         "write); a rank that skips it goes on training and its next collective would pair with this one.")


def _missing_ranks(store: Any, key: str, world: int) -> str:
    try:
        missing = [r for r in range(world) if not store.check([f"{key}/rank/{r}"])]
    except RuntimeError:
        return "<unknown: the store is unreachable>"
    return ", ".join(map(str, missing)) or "<none>"


def _get(store: Any, key: str) -> str:
    try:
        return store.get(key).decode()
    except RuntimeError:
        return "<unknown>"


def _default_store() -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get_store() if get_store is not None else None
    except (RuntimeError, ValueError):
        return None


def _timeout(strategy: Any) -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise ValueError(f"{TIMEOUT_ENV}={value!r} is not valid; set a positive number of seconds.")
        return seconds
    group_timeout = getattr(strategy, "timeout", None)
    return group_timeout.total_seconds() if isinstance(group_timeout, timedelta) else _DEFAULT_TIMEOUT_S


# ---- 3. optimizers over the module's own parameters ------------------------------------------------
def check_optimizer_params(module: torch.nn.Module, optimizers: list[Any]) -> None:
    """Refuse optimizers holding tensors that are not parameters of ``module`` as the Trainer set it up."""
    own = {id(p) for p in module.parameters()}
    for index, optimizer in enumerate(optimizers):
        groups = getattr(optimizer, "param_groups", None) or []
        foreign = [(g, p) for g, group in enumerate(groups) for p in group["params"] if id(p) not in own]
        if not foreign:
            continue
        shapes = ", ".join(f"group {g}: {tuple(p.shape)}" for g, p in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ValueError(
            f"configure_optimizers() returned optimizer {index} ({type(optimizer).__name__}) holding "
            f"{len(foreign)} tensor(s) that are not parameters of {type(module).__name__} as the Trainer set it "
            f"up ({shapes}{more}). Such an optimizer was built before the strategy placed/wrapped the model (e.g. "
            "in __init__) or from another copy of the model, so its steps would not train this module. Create "
            "it inside configure_optimizers() from self.parameters(), and register any extra learnable tensor "
            "on the module as an nn.Parameter or submodule.")


# ---- 2 and 4: placement and hand-stepped optimizers during fit ---------------------------------------------
class FitGuard:
    """Context manager around the fit loop: placement checks (pitfall 2) and hand-stepped optimizers (4).

    The loop calls ``epoch_start()`` at each epoch and the check it returns before every batch; it sets
    ``stepping`` while Kiln itself steps an optimizer, so a step pre-hook can tell a user's
    ``optimizer.step()`` from the Trainer's.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.module = trainer.module
        self.stepping = False
        self._warned = False
        self._hooks: list[Any] = []
        self._placement = [(name, p, p.device, p.dtype) for name, p in self.module.named_parameters()]
        probe = next((entry for entry in self._placement if entry[1].requires_grad), None) or \
            (self._placement[0] if self._placement else None)
        self._probe = probe[1] if probe else None
        if probe:
            # The dict that holds the probe in its owner: a move to another kind of device (meta, XLA) makes new
            # Parameter objects there instead of changing the old one's device.
            owner, _, self._probe_key = probe[0].rpartition(".")
            self._probe_home = self.module.get_submodule(owner)._parameters
            self._probe_device, self._probe_dtype = probe[2], probe[3]

    def __enter__(self) -> FitGuard:
        self.check_all()
        for optimizer in self.trainer.optimizers:
            register = getattr(optimizer, "register_step_pre_hook", None)
            if register is not None:
                self._hooks.append(register(self._on_optimizer_step))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if isinstance(exc, Exception) and not isinstance(exc, PlacementError):
            try:
                self.check_all()  # a confusing dtype/device error inside a step often has this cause: name it
            except PlacementError as placement:
                raise placement from exc

    def epoch_start(self) -> Callable[[], None]:
        """Check every parameter (once per epoch); returns the per-batch check."""
        self.check_all()
        return self.check_step

    def check_step(self) -> None:
        """The cheap per-batch check of one parameter: identity, device and dtype (attribute reads only)."""
        p = self._probe
        if p is not None and (self._probe_home.get(self._probe_key) is not p or p.dtype is not self._probe_dtype
                              or p.device != self._probe_device):
            self.check_all()

    def check_all(self) -> None:
        """Every parameter: same tensor object, device and dtype as when the Trainer set the module up."""
        current = dict(self.module.named_parameters())
        for name, param, device, dtype in self._placement:
            now = current.get(name)
            if now is not None and (now.device != device or now.dtype is not dtype):
                raise PlacementError(
                    f"Parameter {name!r} of {type(self.module).__name__} moved from {device}/{_dtype(dtype)} to "
                    f"{now.device}/{_dtype(now.dtype)} after the Trainer placed it, e.g. by module.to(...), .cuda(), "
                    ".double() or .half() in a hook or step. The strategy (DDP/FSDP wrappers), optimizer state and "
                    "precision plugin were set up for the original placement. Remove the call: choose devices with "
                    "Trainer(accelerator=..., devices=...) and dtypes with Trainer(precision=...), and move only "
                    "batches or new tensors yourself (to self.device).")
            if now is not param:
                raise PlacementError(
                    f"Parameter {name!r} of {type(self.module).__name__} was replaced after the Trainer set the "
                    "module up (a submodule or parameter was reassigned during fit). The optimizers and the strategy "
                    "still hold the old one, so the new one would not be trained or synchronised. Build every layer "
                    "in __init__ or configure_model(), before fit.")

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.stepping or self._warned or not self.module.automatic_optimization:
            return
        self._warned = True
        warnings.warn(
            f"{type(optimizer).__name__}.step() was called by hand during fit under automatic optimization. The "
            "Trainer steps every optimizer itself after backward (with accumulation, clipping, loss scaling and "
            "gradient sync), so this applies an extra update. Remove the call, or set "
            "`automatic_optimization = False` in the module to drive optimizers yourself with self.optimizers() "
            "and self.manual_backward(loss).", stacklevel=3)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
