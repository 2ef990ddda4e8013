"""torch.compile for Kiln runs: what ``Trainer(compile=...)`` compiles, where, and how recompiles are reported.

Kiln compiles ``forward`` in place, per *block*: every FSDP-sharded submodule of the model (the
transformer blocks of FSDP / model-parallel runs), or the module's own ``forward`` when there are
none (single device, DDP). Because the compiled function replaces ``forward`` on the instance:

- module hooks stay outside the compiled region: FSDP2's all-gather/reduce-scatter hooks and DDP's
  reducer run eagerly around it, so ``no_sync`` and ``set_requires_gradient_sync`` keep working and
  the DDP wrapper is never compiled;
- tensor parallelism applied in ``configure_model`` (which runs first) is traced inside each block;
- state-dict keys never gain ``_orig_mod.``: a compiled run's checkpoint loads into an uncompiled
  module and back.

A module compiled by the user with ``torch.compile(module)`` is unwrapped to its TrainModule
(:meth:`CompileSetup.adopt`) and compiled the same way with the user's compiler settings.

Recompilations are counted during the run; past a few, one warning names the most frequent cause
(a changing batch shape suggests ``drop_last=True`` or ``compile={"dynamic": True}``).
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CompileSetup", "compile_options", "compile_targets", "RECOMPILE_WARN_AFTER"]

#: Recompilations tolerated before the warning (requires-grad and train/eval variants, one shape change).
RECOMPILE_WARN_AFTER = 4
_COMPILE_KWARGS = ("fullgraph", "dynamic", "backend", "mode", "options", "disable")
#: Strategies that run the model through another compiler or engine, and what to do instead.
_REFUSED = {
    "deepspeed": "DeepSpeed's engine owns the forward; compile inside DeepSpeed (its 'compile' config) or "
                 "use strategy='ddp'/'fsdp'/'model_parallel'",
    "xla": "XLA already compiles the graph (lazy tensors); leave compile=None",
}


def compile_options(compile: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate ``Trainer(compile=...)``: None/False → None, True → ``{}``, a dict of ``torch.compile`` kwargs."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if not isinstance(compile, dict):
        raise TypeError(f"compile={compile!r} is not valid; pass True, a dict of torch.compile keyword arguments "
                        "(e.g. {'backend': 'inductor', 'dynamic': True}), or None.")
    unknown = sorted(set(compile) - set(_COMPILE_KWARGS))
    if unknown:
        raise ValueError(f"compile={compile!r} has keys {unknown} that torch.compile does not take; use only "
                         f"{list(_COMPILE_KWARGS)}.")
    return dict(compile)


class CompileSetup:
    """What the Trainer holds for ``compile=``: validated once, then applied to each newly set-up module.

    Wiring (Trainer): ``self._compile = CompileSetup(compile, self.strategy)`` in ``__init__``;
    ``module = self._compile.adopt(module)`` first in ``fit``/``validate``/``test``/``predict``;
    ``self._compile.apply(module)`` right after ``self.strategy.setup_module(module)``.
    """

    def __init__(self, compile: bool | dict[str, Any] | None, strategy: Any) -> None:
        self.options = compile_options(compile)
        self.strategy = strategy
        self._compiler: Callable[[Callable], Callable] | None = None
        self.monitor = RecompileMonitor()
        if self.options is not None:
            self._check_strategy()

    @property
    def enabled(self) -> bool:
        return self.options is not None or self._compiler is not None

    @property
    def recompiles(self) -> int:
        """Recompilations seen since the module was last compiled (first compilations not counted)."""
        return self.monitor.count

    def _check_strategy(self) -> None:
        name = getattr(self.strategy, "name", "")
        if name in _REFUSED:
            raise ValueError(f"compile=... cannot be used with strategy={name!r}: {_REFUSED[name]}.")

    def adopt(self, module: Any) -> Any:
        """Unwrap ``torch.compile(module)`` to the module itself, remembering its compiler settings."""
        if "torch._dynamo" not in sys.modules:  # nothing was compiled: do not pay for importing dynamo
            return module
        from torch._dynamo.eval_frame import OptimizedModule

        if not isinstance(module, OptimizedModule):
            return module
        self._check_strategy()
        if self.options is not None:
            warnings.warn("The module passed in was compiled with torch.compile and Trainer(compile=...) is set; "
                          "the Trainer's compile settings are used.", stacklevel=3)
        else:
            self._compiler = module.dynamo_ctx  # compiles any function with the user's backend/mode/dynamic
        return module._orig_mod

    def apply(self, module: nn.Module) -> list[nn.Module]:
        """Compile the forward of each block of the set-up module (once per module); returns the blocks."""
        if not self.enabled:
            return []
        if getattr(module, "_kiln_compiled", False):
            return []
        if self.options is not None:
            options = self.options
            compiler: Callable[[Callable], Callable] = lambda fn: torch.compile(fn, **options)  # noqa: E731
        else:
            compiler = self._compiler
        targets = compile_targets(module)
        codes = set()
        for target in targets:
            forward = target.forward
            code = getattr(getattr(forward, "__func__", forward), "__code__", None)
            if code is not None:
                codes.add(code)
            target.forward = compiler(forward)
        object.__setattr__(module, "_kiln_compiled", True)
        self.monitor.start(codes)
        return targets


def compile_targets(module: nn.Module) -> list[nn.Module]:
    """The modules whose ``forward`` is compiled: FSDP-sharded blocks inside ``module`` (outermost only,
    so nested groups are traced once), or ``module`` itself when it holds none."""
    from torch.distributed.fsdp import FSDPModule

    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for sub in module.modules():
        if sub is module or id(sub) in inside or not isinstance(sub, FSDPModule):
            continue
        blocks.append(sub)
        inside.update(id(m) for m in sub.modules())
    return blocks or [module]


_ACTIVE: RecompileMonitor | None = None  # the monitor of the run that compiled last (runs are sequential)


def _on_compile_end(args: Any) -> None:
    if _ACTIVE is not None:
        _ACTIVE.on_compile_end(args)


class RecompileMonitor:
    """Counts recompilations of the functions a run compiled and warns once past a few.

    A recompilation is a compilation of an already compiled frame (compile id ``F/R`` with R ≥ 1) whose
    guard failures (``torch._dynamo.utils.guard_failures``, the reasons TORCH_LOGS=recompiles prints)
    grew for one of this run's functions. Runs only when dynamo finishes a compilation: nothing per step.
    """

    _installed = False

    def __init__(self, warn_after: int = RECOMPILE_WARN_AFTER) -> None:
        self.warn_after = warn_after
        self.count = 0
        self.causes: Counter[str] = Counter()
        self._codes: set[Any] = set()
        self._seen: dict[Any, int] = {}
        self._warned = False

    def start(self, codes: set[Any]) -> None:
        """Count from now on, for the functions whose code objects are ``codes`` (all frames if empty)."""
        global _ACTIVE
        from torch._dynamo import callback_handler
        from torch._dynamo.utils import guard_failures

        self.count, self.causes, self._warned, self._codes = 0, Counter(), False, set(codes)
        self._seen = {code: len(reasons) for code, reasons in guard_failures.items()}
        if not RecompileMonitor._installed:
            callback_handler.register_end_callback(_on_compile_end)
            RecompileMonitor._installed = True
        _ACTIVE = self

    def on_compile_end(self, args: Any) -> None:
        from torch._dynamo.utils import guard_failures

        attempt = str(getattr(args, "compile_id", "") or "").split("/")[-1]
        if not attempt.isdigit() or attempt == "0":
            return  # a first compilation of some frame, not a recompile
        new = []
        for code, reasons in list(guard_failures.items()):
            if self._codes and code not in self._codes:
                continue
            new += reasons[self._seen.get(code, 0):]
            self._seen[code] = len(reasons)
        if not new:
            return  # another function recompiled
        self.count += 1
        for reason in new:
            self.causes[reason.split(": ", 1)[-1]] += 1
        if self.count > self.warn_after and not self._warned:
            self._warned = True
            warnings.warn(self.message(), RuntimeWarning, stacklevel=2)

    def message(self) -> str:
        cause = self.causes.most_common(1)[0][0] if self.causes else "unknown (set TORCH_LOGS=recompiles to see it)"
        text = (f"torch.compile recompiled the model {self.count} times during this run (more than "
                f"{self.warn_after}); most frequent cause: {cause}.")
        if "size mismatch" in cause or "shape" in cause:
            text += (" The input shape changes between steps (often the epoch's last, smaller batch): pass "
                     "drop_last=True to the DataLoader, or compile={'dynamic': True} for shape-generic code.")
        return text
