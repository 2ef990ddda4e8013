"""LambdaCallback: a callback from plain functions, one keyword argument per hook (Lightning's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from framework.hooks import Callback


def _hook_names() -> tuple[str, ...]:
    return tuple(n for n in vars(Callback) if n.startswith("on_") or n in ("setup", "teardown"))


class LambdaCallback(Callback):
    """``LambdaCallback(on_train_epoch_end=lambda trainer, module: ...)``: each function is called with the
    hook's arguments, without ``self``. A hook name Kiln's Callback does not have is refused."""

    def __new__(cls, **hooks: Callable[..., Any]) -> LambdaCallback:
        known = _hook_names()
        unknown = sorted(set(hooks) - set(known))
        if unknown:
            raise TypeError(f"LambdaCallback got {unknown}, which are not Callback hooks; the hooks are "
                            f"{', '.join(known)}.")
        for name, fn in hooks.items():
            if fn is not None and not callable(fn):
                raise TypeError(f"LambdaCallback({name}={fn!r}): pass a function taking (trainer, module, ...).")
        # The Trainer dispatches only hooks a callback's class overrides, so each instance gets its own class.
        body = {name: staticmethod(fn) for name, fn in hooks.items() if fn is not None}
        body["__qualname__"] = cls.__qualname__
        return super().__new__(type(cls.__name__, (cls,), body))

    def __init__(self, **hooks: Callable[..., Any]) -> None:
        self.hooks = {name: fn for name, fn in hooks.items() if fn is not None}

    def __reduce__(self) -> Any:  # the per-instance class cannot be pickled by name
        return (_rebuild, (self.hooks,))


def _rebuild(hooks: dict[str, Callable[..., Any]]) -> LambdaCallback:
    return LambdaCallback(**hooks)
