"""Precision plugins: everything numeric about a training step lives here.

A Precision converts the module and inputs, opens the forward autocast context, scales the loss for
backward, unscales gradients, and performs the optimizer step (reporting whether the step was skipped
because fp16 gradients overflowed). Strategies call these methods and never inspect dtypes themselves,
so a new numeric mode is one class, not a branch in every strategy.

Strings (contract): "32-true" (alias "32"), "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

NO_CONTEXT = nullcontext()  # the context that does nothing: hot loops check for it and skip the `with`


class Precision:
    """Full fp32 precision; the base every other plugin refines.

    ``converts_input`` tells the loop whether ``convert_input`` must run on each batch (skipped when False,
    which keeps the fp32 hot path free of a batch traversal).
    """

    name: str = "32-true"
    converts_input: bool = False
    scaler: torch.amp.GradScaler | None = None

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Return the module with parameters in this precision's storage dtype."""
        return module

    def convert_input(self, batch: Any) -> Any:
        """Cast floating-point tensors of a batch to the compute dtype (only for ``*-true`` modes)."""
        return batch

    def forward_context(self) -> AbstractContextManager:
        """Context wrapping forward passes (training, evaluation and prediction steps)."""
        return NO_CONTEXT

    def backward(self, loss: torch.Tensor, *args: Any, backward_fn: Callable[..., Any] | None = None,
                 **kwargs: Any) -> None:
        """Backpropagate the scaled loss; ``backward_fn`` is the module's ``backward`` when it overrides it, and
        ``args``/``kwargs`` go on to it (e.g. ``retain_graph=True`` from ``manual_backward``)."""
        scaled = self.scale_loss(loss)
        if backward_fn is None:
            scaled.backward(*args, **kwargs)
        else:
            backward_fn(scaled, *args, **kwargs)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as backward must see it (scaled by the fp16 loss scaler; unchanged otherwise)."""
        return loss

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to their true scale before clipping or inspection (no-op without a scaler)."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None,
                       **kwargs: Any) -> bool:
        """Step the optimizer (``closure`` and ``kwargs`` passed to its ``step``); return False when the step was
        skipped (fp16 overflow)."""
        if closure is None:
            optimizer.step(**kwargs) if kwargs else optimizer.step()
        else:
            optimizer.step(closure=closure, **kwargs)
        return True

    def finish_step(self) -> None:
        """Called once every optimizer of an iteration has stepped (the fp16 scaler updates its scale here)."""

    def setup_sharded(self) -> None:
        """Called by sharding strategies (FSDP) before the first step, e.g. to swap in a sharded scaler."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()``; plugins without state accept an empty dict."""

    @property
    def adds_nothing_to_steps(self) -> bool:
        """True when this plugin leaves forward, backward and the optimizer step as they are (none of those
        methods refined): the loop may then call ``loss.backward()`` and ``optimizer.step()`` itself."""
        cls = type(self)
        return all(getattr(cls, name) is getattr(Precision, name) for name in _STEP_METHODS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


_STEP_METHODS = ("forward_context", "backward", "scale_loss", "optimizer_step", "finish_step")


class DoublePrecision(Precision):
    """``"64-true"``: parameters and floating-point inputs in float64 (numerical checks, gradcheck).

    Inside steps the default dtype is float64 too, so tensors a forward creates (``torch.zeros(n)``)
    match the parameters.
    """

    name = "64-true"
    converts_input = True
    dtype = torch.float64

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(dtype=self.dtype)

    def convert_input(self, batch: Any) -> Any:
        return cast_floats(batch, self.dtype)

    def forward_context(self) -> AbstractContextManager:
        return _default_dtype(self.dtype)


class HalfPrecision(DoublePrecision):
    """``"16-true"`` / ``"bf16-true"``: parameters, gradients and optimizer state all in half precision."""

    def __init__(self, dtype: torch.dtype) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"HalfPrecision(dtype={dtype}) is not supported; use torch.float16 or torch.bfloat16 "
                             "(or DoublePrecision for float64).")
        self.dtype = dtype
        self.name = "16-true" if dtype == torch.float16 else "bf16-true"


class MixedPrecision(Precision):
    """``"16-mixed"`` / ``"bf16-mixed"``: fp32 parameters, forward under ``torch.autocast``.

    fp16 uses a ``torch.amp.GradScaler`` (exposed as ``.scaler``): the loss is scaled for backward,
    gradients are unscaled once per optimizer step, and a step whose gradients hold inf/NaN is skipped
    while the scale is lowered. bf16 has fp32's exponent range and needs no scaler.

    The scale is updated once per iteration, after every optimizer has stepped (``finish_step``, and at
    the latest before the next backward): updating after the first of several optimizers would unscale
    the others' gradients with a scale they were not produced with.
    """

    def __init__(self, dtype: torch.dtype, device_type: str = "cpu", scaler: torch.amp.GradScaler | None = None):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"MixedPrecision(dtype={dtype}) is not supported; use torch.float16 or torch.bfloat16.")
        self.dtype = dtype
        self.device_type = device_type
        self.name = "16-mixed" if dtype == torch.float16 else "bf16-mixed"
        if dtype == torch.float16 and scaler is None:
            scaler = torch.amp.GradScaler(device_type)
        self.scaler = scaler
        self._unscaled: set[int] = set()  # optimizers unscaled since the last scale update
        self._stepped: set[int] = set()  # optimizers stepped through the scaler since the last update

    def set_device_type(self, device_type: str) -> None:
        """Re-target autocast and the scaler once the strategy knows the device (scaler state is kept)."""
        if device_type == self.device_type:
            return
        self.device_type = device_type
        if self.scaler is not None:
            self.scaler = _rebuild_scaler(self.scaler, type(self.scaler), device_type, self)

    def setup_sharded(self) -> None:
        if self.scaler is not None and not _is_sharded_scaler(self.scaler):
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = _rebuild_scaler(self.scaler, ShardedGradScaler, self.device_type, self)

    def forward_context(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if self.scaler is None:
            return loss
        self.finish_step()  # gradients of a new iteration are scaled with the updated scale
        return self.scaler.scale(loss)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None and id(optimizer) not in self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled.add(id(optimizer))

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None,
                       **kwargs: Any) -> bool:
        scaler = self.scaler
        if scaler is None:
            return super().optimizer_step(optimizer, closure, **kwargs)
        if closure is not None:  # GradScaler cannot step with a closure: run it once first (as Lightning does)
            closure()
        if id(optimizer) in self._stepped:  # stepped again without a backward in between
            self.finish_step()
        self.unscale_gradients(optimizer)
        found_inf = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        if not found_inf:  # no parameter has a gradient: nothing to check, and the scaler refuses to step
            scaler._per_optimizer_states.pop(id(optimizer), None)
            self._unscaled.discard(id(optimizer))
            optimizer.step(**kwargs)
            return True
        # One host sync per optimizer step; GradScaler.step makes the same one.
        skipped = any(flag.item() for flag in found_inf.values())
        scaler.step(optimizer, **kwargs)
        self._stepped.add(id(optimizer))
        return not skipped

    def finish_step(self) -> None:
        if self._stepped:
            self.scaler.update()
            self._stepped.clear()
            self._unscaled.clear()

    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return {}
        self.finish_step()
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None and state_dict.get("scaler"):
            self.finish_step()
            self.scaler.load_state_dict(state_dict["scaler"])


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _is_sharded_scaler(scaler: Any) -> bool:
    return type(scaler).__name__ == "ShardedGradScaler"


def _rebuild_scaler(old: torch.amp.GradScaler, cls: type, device_type: str,
                    plugin: MixedPrecision) -> torch.amp.GradScaler:
    """A scaler of ``cls`` on ``device_type`` carrying ``old``'s scale, growth tracker and factors."""
    plugin.finish_step()
    new = cls(device_type, enabled=old.is_enabled())
    state = old.state_dict()
    if state:
        new.load_state_dict(state)
    return new


def cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    """Cast the floating-point tensors of a batch (nested mappings/sequences/namedtuples) to ``dtype``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(cast_floats(v, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_floats(v, dtype) for v in batch)
    return batch


PRECISION_STRINGS = ("32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


def resolve_precision(precision: str | int | Precision, device_type: str = "cpu") -> Precision:
    """Turn the Trainer's ``precision=`` argument into a plugin instance."""
    if isinstance(precision, Precision):
        return precision
    key = str(precision)
    if key in ("32-true", "32"):
        return Precision()
    if key in ("64-true", "64"):
        return DoublePrecision()
    if key == "16-mixed":
        return MixedPrecision(torch.float16, device_type)
    if key == "bf16-mixed":
        return MixedPrecision(torch.bfloat16, device_type)
    if key == "16-true":
        return HalfPrecision(torch.float16)
    if key == "bf16-true":
        return HalfPrecision(torch.bfloat16)
    hint = {"16": "16-mixed", "bf16": "bf16-mixed", "fp16": "16-mixed", "float16": "16-mixed"}.get(key.lower())
    raise ValueError(
        f"precision={precision!r} is not a known precision. Use one of {', '.join(repr(p) for p in PRECISION_STRINGS)}"
        + (f" (did you mean {hint!r}?)" if hint else "")
        + ", or pass a framework.precision.Precision instance."
    )
