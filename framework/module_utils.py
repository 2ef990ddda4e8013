"""TrainModule utilities with Lightning's names: ranks, loggers, printing, toggling optimizers,
``all_gather``, freezing, export, and the step-signature helper the loops use.

A mixin of :class:`framework.module.TrainModule`; every attribute reads the attached Trainer when
there is one and has Lightning's value without one (rank 0, no loggers, ...).
"""

from __future__ import annotations

import builtins
import functools
import inspect
import os
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["ModuleUtilities", "step_takes_batch_idx", "step_takes_dataloader_idx"]


class ModuleUtilities:
    """Mixed into TrainModule (an ``nn.Module``); see the module docstring."""

    # Properties TorchScript must not compile (they reach the Trainer); read by torch.jit.script.
    __jit_unused_properties__: list[str] = [
        "example_input_array", "on_gpu", "current_epoch", "global_step", "global_rank", "local_rank", "logger",
        "loggers", "trainer", "fabric", "strict_loading", "device", "dtype", "hparams", "hparams_initial",
    ]
    _example_input_array: Any = None
    _jit_is_scripting: bool = False  # while exporting, ``trainer`` reads as None instead of raising (jit probes it)
    _strict_loading: bool | None = None

    # ---- topology, loggers ------------------------------------------------------------------------
    @property
    def global_rank(self) -> int:
        """This process's index over all nodes (0 without a Trainer)."""
        trainer = self._trainer
        return trainer.global_rank if trainer is not None else 0

    @property
    def local_rank(self) -> int:
        """This process's index on its node (0 without a Trainer)."""
        trainer = self._trainer
        return trainer.local_rank if trainer is not None else 0

    @property
    def logger(self) -> Any:
        """The Trainer's first logger (its ``.experiment`` is the backend object), or None."""
        trainer = self._trainer
        return trainer.logger if trainer is not None else None

    @property
    def loggers(self) -> list[Any]:
        """All of the Trainer's loggers ([] without a Trainer)."""
        trainer = self._trainer
        return list(trainer.loggers) if trainer is not None else []

    @property
    def fabric(self) -> None:
        """Always None: Kiln has no Fabric; the Trainer drives the module."""
        return None

    @property
    def on_gpu(self) -> bool:
        """True when the module runs on a CUDA device."""
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the parameters (the default dtype when there are none)."""
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.get_default_dtype()

    @property
    def example_input_array(self) -> Any:
        """An input for ``forward`` (a tensor, a tuple of positional args, or a dict of kwargs) used by
        exports and loggers' model graphs."""
        return self._example_input_array

    @example_input_array.setter
    def example_input_array(self, example: Any) -> None:
        object.__setattr__(self, "_example_input_array", example)

    @property
    def strict_loading(self) -> bool:
        """Whether checkpoints load with ``load_state_dict(strict=True)`` (default True)."""
        return self._strict_loading in (None, True)

    @strict_loading.setter
    def strict_loading(self, strict: bool) -> None:
        object.__setattr__(self, "_strict_loading", bool(strict))

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank 0 only (through the progress bar when it has a ``print``)."""
        from framework.rank_zero import rank_zero_only

        trainer = self._trainer
        if (trainer.is_global_zero if trainer is not None else rank_zero_only.rank == 0):
            bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
            printer = getattr(bar, "print", None) if bar is not None and getattr(bar, "is_enabled", True) else None
            (printer or builtins.print)(*args, **kwargs)

    # ---- optimizers (manual optimization) -----------------------------------------------------------
    def toggle_optimizer(self, optimizer: Any) -> None:
        """Let only ``optimizer``'s parameters require grad (the others' flags are remembered), so a backward in
        a multi-optimizer step leaves no stray gradients. Undo with :meth:`untoggle_optimizer`."""
        saved: dict[torch.nn.Parameter, bool] = {}
        for opt in self.trainer.optimizers:
            for group in _unwrap(opt).param_groups:
                for param in group["params"]:
                    if param not in saved:
                        saved[param] = param.requires_grad
                        param.requires_grad = False
        for group in _unwrap(optimizer).param_groups:
            for param in group["params"]:
                param.requires_grad = saved.get(param, param.requires_grad)
        object.__setattr__(self, "_param_requires_grad_state", saved)

    def untoggle_optimizer(self, optimizer: Any) -> None:
        """Restore the ``requires_grad`` flags :meth:`toggle_optimizer` changed."""
        saved = self.__dict__.get("_param_requires_grad_state") or {}
        target = _unwrap(optimizer)
        for opt in self.trainer.optimizers:
            if _unwrap(opt) is target:
                continue
            for group in _unwrap(opt).param_groups:
                for param in group["params"]:
                    if param in saved:
                        param.requires_grad = saved[param]
        object.__setattr__(self, "_param_requires_grad_state", {})

    @contextmanager
    def toggled_optimizer(self, optimizer: Any) -> Generator[None, None, None]:
        """``toggle_optimizer`` for the block, ``untoggle_optimizer`` after it (also on error)."""
        self.toggle_optimizer(optimizer)
        try:
            yield
        finally:
            self.untoggle_optimizer(optimizer)

    # ---- collectives --------------------------------------------------------------------------------
    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Gather tensors (or numbers, or collections of them) from every process: each tensor gains a leading
        dimension of size world_size (none when world_size is 1). Every process must call it with equal shapes.
        ``sync_grads=True`` keeps the result differentiable."""
        trainer = self.trainer
        device = self.device

        def gather(value: Any) -> Any:
            if isinstance(value, Mapping):
                return type(value)((k, gather(v)) for k, v in value.items())
            if isinstance(value, (list, tuple)):
                items = [gather(v) for v in value]
                return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
            if isinstance(value, (int, float, bool)):
                value = torch.tensor(value, device=device)
            if not isinstance(value, torch.Tensor):
                return value
            if trainer.world_size == 1:
                return value
            if group is None and not sync_grads:
                return trainer.strategy.all_gather(value)
            return _dist_all_gather(value, group, sync_grads)

        return gather(data)

    # ---- inference helpers --------------------------------------------------------------------------
    def freeze(self) -> None:
        """No parameter requires grad, and eval mode (for inference)."""
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    def unfreeze(self) -> None:
        """Every parameter requires grad again, and train mode."""
        for param in self.parameters():
            param.requires_grad = True
        self.train()

    @torch.no_grad()
    def to_torchscript(self, file_path: str | os.PathLike | None = None, method: str | None = "script",
                       example_inputs: Any = None, **kwargs: Any) -> Any:
        """The module as TorchScript (``method="script"`` or ``"trace"``, in eval mode), saved to ``file_path``
        when given. Tracing uses ``example_inputs`` or ``example_input_array``."""
        mode = self.training
        modules = [m for m in self.modules() if isinstance(m, ModuleUtilities)]
        for m in modules:
            object.__setattr__(m, "_jit_is_scripting", True)
        try:
            if method == "script":
                scripted = torch.jit.script(self.eval(), **kwargs)
            elif method == "trace":
                inputs = example_inputs if example_inputs is not None else self.example_input_array
                if inputs is None:
                    raise ValueError("to_torchscript(method='trace') needs example_inputs=... or "
                                     "self.example_input_array set to an input for forward().")
                scripted = torch.jit.trace(func=self.eval(), example_inputs=inputs, **kwargs)
            else:
                raise ValueError(f"to_torchscript(method={method!r}): use 'script' or 'trace'.")
        finally:
            for m in modules:
                object.__setattr__(m, "_jit_is_scripting", False)
            self.train(mode)
        if file_path is not None:
            torch.jit.save(scripted, os.fspath(file_path))
        return scripted

    @torch.no_grad()
    def to_onnx(self, file_path: str | os.PathLike | Any = None, input_sample: Any = None, **kwargs: Any) -> Any:
        """Export to ONNX with ``torch.onnx.export`` (needs the ``onnx`` package); the input is ``input_sample``
        or ``example_input_array``."""
        import importlib.util

        if importlib.util.find_spec("onnx") is None:
            raise ModuleNotFoundError(f"{type(self).__name__}.to_onnx() needs the 'onnx' package: pip install onnx "
                                      "onnxscript")
        if input_sample is None:
            if self.example_input_array is None:
                raise ValueError("to_onnx() needs input_sample=... or self.example_input_array set to an input for "
                                 "forward().")
            input_sample = self.example_input_array
        mode = self.training
        try:
            return torch.onnx.export(self.eval(), input_sample, os.fspath(file_path) if isinstance(
                file_path, os.PathLike) else file_path, **kwargs)
        finally:
            self.train(mode)


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer behind a wrapper from ``self.optimizers()``."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _dist_all_gather(tensor: torch.Tensor, group: Any, sync_grads: bool) -> torch.Tensor:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_gather(group=..., sync_grads=True) needs torch.distributed initialised by a "
                           "distributed strategy.")
    if sync_grads:
        from torch.distributed.nn.functional import all_gather

        return torch.stack(all_gather(tensor.contiguous(), group=group or dist.group.WORLD))
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


# ---- step signatures (for the loops) ----------------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def _positional_params(fn: Callable[..., Any]) -> tuple[tuple[str, ...], bool]:
    """Names of the positional parameters (after self) and whether it takes ``*args``."""
    fn = inspect.unwrap(fn)
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "self" and inspect.isfunction(fn):
        params = params[1:]
    names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return names, any(p.kind is p.VAR_POSITIONAL for p in params)


def _step_function(step: Any) -> Callable[..., Any]:
    return getattr(step, "__func__", step)  # a bound method's function: the cache is per class, not per object


def step_takes_batch_idx(step: Callable[..., Any]) -> bool:
    """Whether a step method (``training_step``, ``validation_step``, ...) is called with ``batch_idx``:
    Lightning's rule — it names ``batch_idx``, takes ``*args``, or has at least two positional parameters.
    Cached per function, so asking once per run or per batch costs the same."""
    names, varargs = _positional_params(_step_function(step))
    return "batch_idx" in names or varargs or len(names) >= 2


def step_takes_dataloader_idx(step: Callable[..., Any]) -> bool:
    """Whether an evaluation/predict step accepts ``dataloader_idx``: Lightning's rule — it names
    ``dataloader_idx`` or takes ``*args``."""
    names, varargs = _positional_params(_step_function(step))
    return "dataloader_idx" in names or varargs
