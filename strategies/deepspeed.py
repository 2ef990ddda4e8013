"""DeepSpeedStrategy: ZeRO stages 1–3 through one DeepSpeed engine per process (gloo on CPU, NCCL on CUDA).

Kiln keeps control of the loop and DeepSpeed owns the numerics of a step:

- the engine is built in ``setup_optimizers`` from the user's single optimizer (DeepSpeed has one
  engine = one model + one optimizer, so several optimizers are refused); LR schedulers stay with
  Kiln, which steps them only after applied steps (an fp16 overflow skip leaves them alone);
- accumulation: the engine runs with ``gradient_accumulation_steps=1`` and Kiln divides each
  micro-batch loss by its window length; ``no_sync`` tells the engine whether the micro-batch closes a
  window, and ``engine.step()`` runs exactly at Kiln's window ends, short tail windows included;
- ``gradient_clip_val`` becomes the engine's ``gradient_clipping`` (by norm; DeepSpeed has no
  clipping by value); precision becomes its ``fp16``/``bf16`` section;
- every step (training, validation, test, predict) runs through the engine's forward.

``deepspeed`` is imported only when a DeepSpeedStrategy is set up.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from framework.precision import (
    NO_CONTEXT,
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
    cast_floats,
)
from strategies.deepspeed_config import _load_config, _merge_precision, _resolve_stage
from strategies.parallel import ParallelStrategy, _StepDispatcher

if TYPE_CHECKING:
    from framework.module import TrainModule

INSTALL_HINT = "pip install kiln[deepspeed]  (or: pip install deepspeed)"

_PRECISION_DTYPES = {"16-mixed": torch.float16, "16-true": torch.float16, "bf16-mixed": torch.bfloat16,
                     "bf16-true": torch.bfloat16, "32-true": None, "32": None}
# Keys that Kiln's own arguments decide; a config dict naming them is refused with the Trainer argument to use.
_BUILTIN_PRECISIONS = (Precision, DoublePrecision, HalfPrecision, MixedPrecision)
_KILN_OWNED = {"optimizer": "return the optimizer from configure_optimizers()",
               "scheduler": "return the LR scheduler from configure_optimizers()"}


def check_deepspeed_installed(strategy_name: str = "deepspeed") -> None:
    """Raise an ImportError with the install hint when deepspeed cannot be imported."""
    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(f"strategy={strategy_name!r} needs the deepspeed package, which is not installed. "
                          f"Install it with: {INSTALL_HINT}; or use strategy='ddp' or 'fsdp'.")


class DeepSpeedPrecision(Precision):
    """The Trainer's precision as DeepSpeed runs it: the engine keeps fp32 master weights, scales fp16 losses
    and skips overflowed steps itself, so this plugin only shapes the forward pass.

    ``*-mixed``: the engine holds the module in fp16/bf16 and the forward runs under ``torch.autocast`` (so
    inputs need no cast and numerically sensitive ops stay in fp32). ``*-true``: floating-point inputs are cast
    to the module's dtype. There is no ``GradScaler`` (``scaler`` is None): the loss scale is the engine's.
    """

    def __init__(self, name: str, device_type: str = "cpu") -> None:
        if name not in _PRECISION_DTYPES:
            raise ValueError(f"precision={name!r} is not supported by strategy='deepspeed'; use one of "
                             "'32-true', '16-mixed', 'bf16-mixed', '16-true' or 'bf16-true'.")
        self.name = "32-true" if name == "32" else name
        self.dtype = _PRECISION_DTYPES[name]
        self.device_type = device_type
        self.converts_input = self.name.endswith("-true") and self.dtype is not None
        self.engine: Any = None  # set by DeepSpeedStrategy once the engine exists

    def config(self) -> dict[str, Any]:
        """The ``fp16``/``bf16`` section DeepSpeed needs for this precision ({} for fp32)."""
        if self.dtype == torch.float16:
            # hysteresis=1: every overflow lowers the scale at once, as torch's GradScaler does.
            return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 1}}
        if self.dtype == torch.bfloat16:
            return {"bf16": {"enabled": True}}
        return {}

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Refuse fp16 where DeepSpeed's accelerator lacks it; cast the module for ``*-true``."""
        if self.dtype == torch.float16:
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():
                raise ValueError(f"precision={self.name!r}: DeepSpeed's {get_accelerator().device_name()} "
                                 "accelerator does not support fp16 on this machine. Use precision='bf16-mixed' "
                                 "(or a GPU for fp16).")
        return module.to(dtype=self.dtype) if self.converts_input else module

    def convert_input(self, batch: Any) -> Any:
        return cast_floats(batch, self.dtype) if self.converts_input else batch

    def forward_context(self) -> AbstractContextManager:
        if self.dtype is None or self.converts_input:
            return NO_CONTEXT
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, *args: Any, backward_fn: Any = None, **kwargs: Any) -> None:
        """``engine.backward``: scales fp16 losses and reduces/partitions gradients as its ZeRO stage does."""
        if backward_fn is not None or args:
            raise ValueError("DeepSpeed runs backward inside its engine, so a backward() override on the module (or "
                             "positional backward arguments) cannot be honoured; remove the override, or use "
                             "strategy='ddp'/'fsdp'. Keyword arguments such as retain_graph=True are passed on.")
        self._engine().backward(loss, **kwargs)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None,
                       **kwargs: Any) -> bool:
        """``engine.step()``: unscale, clip, step and clear gradients; False when an fp16 overflow skipped it.
        A closure runs once first (the engine's step takes none); step keyword arguments are refused."""
        if kwargs:
            raise TypeError(f"optimizer.step() got keyword arguments {sorted(kwargs)}, but DeepSpeed steps through "
                            "engine.step(), which takes none; drop them or use strategy='ddp'/'fsdp'.")
        if closure is not None:
            closure()
        engine = self._engine()
        engine.step()
        return engine.was_step_applied()

    def _engine(self) -> Any:
        if self.engine is None:
            raise RuntimeError("DeepSpeedPrecision has no engine yet: DeepSpeedStrategy.setup_optimizers builds it.")
        return self.engine


class DeepSpeedStrategy(ParallelStrategy):
    """Train with DeepSpeed ZeRO (``stage`` 1: optimizer state, 2: + gradients, 3: + parameters sharded).

    - ``stage``: the ZeRO stage; None means the config's ``zero_optimization.stage``, else 2.
    - ``offload_optimizer``: keep optimizer state (and the step) in CPU memory; ``offload_parameters``
      (stage 3 only): keep parameters in CPU memory between uses.
    - ``config``: a DeepSpeed config dict or a path to a JSON file; its settings win over the arguments
      above (``stage`` must agree with ``zero_optimization.stage`` when both are given). Settings that
      Kiln's own arguments decide are refused with the argument to use instead: the optimizer and scheduler
      (``configure_optimizers``), ``gradient_accumulation_steps`` (``accumulate_grad_batches``),
      ``gradient_clipping`` (``gradient_clip_val``) and ``fp16``/``bf16`` (``precision``) when they contradict.
    - ``logging_level``: level of DeepSpeed's own logger (WARNING keeps its per-step INFO lines out).
    """

    name = "deepspeed"
    is_sharded = True

    def __init__(self, accelerator: str = "cpu", devices: int = 1, num_nodes: int = 1, stage: int | None = None,
                 offload_optimizer: bool = False, offload_parameters: bool = False,
                 config: dict[str, Any] | str | os.PathLike | None = None, logging_level: int = logging.WARNING,
                 process_group_backend: str | None = None, timeout: timedelta = timedelta(minutes=30)) -> None:
        check_deepspeed_installed(self.name)
        super().__init__(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.user_config = _load_config(config)
        self.stage = _resolve_stage(stage, self.user_config)
        if offload_parameters and self.stage != 3:
            raise ValueError(f"offload_parameters=True needs ZeRO stage 3 (parameters are only sharded there), but "
                             f"stage={self.stage}; use stage=3 or offload_optimizer=True.")
        self.offload_optimizer = bool(offload_optimizer)
        self.offload_parameters = bool(offload_parameters)
        self.logging_level = logging_level
        self.engine: Any = None  # deepspeed.DeepSpeedEngine once built
        self._grad_factor: float | None = None

    # ---- environment -----------------------------------------------------------------------
    def setup_environment(self) -> None:
        deepspeed = _import_deepspeed(self.accelerator)
        super().setup_environment()
        os.environ.setdefault("LOCAL_RANK", str(self.local_rank))  # some DeepSpeed code paths read it directly
        deepspeed.utils.logging.logger.setLevel(self.logging_level)
        deepspeed.init_distributed(dist_backend=self.backend, dist_init_required=False)

    def connect_precision(self, precision: Precision) -> DeepSpeedPrecision:
        """The Trainer's precision plugin as DeepSpeed runs it (fp16/bf16 handled by the engine)."""
        if isinstance(precision, DeepSpeedPrecision):
            return precision
        # Exact types: a subclass of a built-in plugin changes numerics that the engine would not run.
        if type(precision) not in _BUILTIN_PRECISIONS:
            raise ValueError(f"precision={precision!r} is a custom plugin; strategy='deepspeed' runs mixed "
                             "precision inside its engine and supports the strings '32-true', '16-mixed', "
                             "'bf16-mixed', '16-true' and 'bf16-true'.")
        self.precision = DeepSpeedPrecision(precision.name, self.root_device.type)
        return self.precision

    # ---- model and engine ----------------------------------------------------------------------
    def wrap_module(self, module: TrainModule) -> torch.nn.Module:
        """Place the module; the engine is built with the optimizer (``setup_optimizers``) or, for
        evaluation under ZeRO-3, on the first evaluation step."""
        self.engine = None
        return module.to(self.root_device)

    def setup_optimizers(self, optimizers: list[torch.optim.Optimizer], *, gradient_clip_val: float | None = None,
                         gradient_clip_algorithm: str = "norm") -> list[torch.optim.Optimizer]:
        """Build the DeepSpeed engine around the module and the (single) optimizer; the Trainer's clipping
        settings become the engine's ``gradient_clipping`` (DeepSpeed clips inside ``engine.step()``)."""
        if len(optimizers) != 1:
            raise ValueError(
                f"configure_optimizers() returned {len(optimizers)} optimizers, but DeepSpeed wraps one model and "
                "one optimizer into a single engine, so strategy='deepspeed' supports exactly one optimizer. For "
                "several models with their own optimizers (e.g. a GAN's generator and discriminator) use "
                "strategy='ddp' or 'fsdp', or return one optimizer with a parameter group per sub-model.")
        self.engine = self._initialize(self._training_config(gradient_clip_val, gradient_clip_algorithm),
                                       optimizers[0])
        self.model = self.precision.engine = self.engine
        self.optimizers = optimizers
        return optimizers

    def _initialize(self, config: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> Any:
        import deepspeed

        from strategies.deepspeed_checkpoint import SafeCheckpointEngine

        engine, *_ = deepspeed.initialize(model=_StepDispatcher(self.module), optimizer=optimizer, config=config,
                                          dist_init_required=False)
        engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
        return engine

    def _training_config(self, clip: float | None = None, algorithm: str = "norm") -> dict[str, Any]:
        """The engine config for training with the Trainer's ``gradient_clip_val``/``_algorithm``."""
        config = self._base_config()
        config.setdefault("zero_allow_untested_optimizer", True)  # the user's torch optimizer is the point
        config.setdefault("zero_force_ds_cpu_optimizer", False)
        gas = config.setdefault("gradient_accumulation_steps", 1)
        if gas != 1:
            raise ValueError(f"config['gradient_accumulation_steps']={gas!r}: Kiln decides accumulation windows. "
                             f"Remove it from the DeepSpeed config and pass Trainer(accumulate_grad_batches={gas}).")
        config.setdefault("gradient_clipping", 0.0)  # DeepSpeed's own default (1.0) would clip silently
        if clip:
            if algorithm != "norm":
                raise ValueError(f"gradient_clip_algorithm={algorithm!r} is not supported by strategy='deepspeed': "
                                 "DeepSpeed clips by the global gradient norm only. Use gradient_clip_algorithm='norm'.")
            if config["gradient_clipping"] not in (0.0, clip):
                raise ValueError(f"Trainer(gradient_clip_val={clip!r}) contradicts the DeepSpeed config's "
                                 f"gradient_clipping={config['gradient_clipping']!r}; set it in one place only.")
            config["gradient_clipping"] = float(clip)
        return config

    def _base_config(self) -> dict[str, Any]:
        """The config shared by training and inference engines: ZeRO, precision, batch size, logging."""
        config = copy.deepcopy(self.user_config)
        for key, fix in _KILN_OWNED.items():
            if key in config:
                raise ValueError(f"The DeepSpeed config has an {key!r} section, but Kiln builds the engine from "
                                 f"the module: {fix} and remove config[{key!r}].")
        zero = config.setdefault("zero_optimization", {})
        zero["stage"] = self.stage
        if self.offload_optimizer:
            zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": self.accelerator == "cuda"})
        if self.offload_parameters:
            zero.setdefault("offload_param", {"device": "cpu", "pin_memory": self.accelerator == "cuda"})
        config.setdefault("train_micro_batch_size_per_gpu", 1)  # only used in DeepSpeed's throughput logs
        config.setdefault("steps_per_print", 2**31 - 1)
        _merge_precision(config, self.precision, self.precision.config()
                         if isinstance(self.precision, DeepSpeedPrecision) else {})
        return config

    def step_function(self, name: str) -> Callable[..., Any]:
        """Steps run through the engine's forward; under ZeRO-3 evaluation builds an inference engine first."""
        if self.engine is None and self.stage == 3:
            self.engine = self._initialize(self._base_config(), None)
            self.model = self.engine
        return super().step_function(name)

    # ---- backward and step ------------------------------------------------------------------------
    def no_sync(self, skip_sync: bool) -> AbstractContextManager:
        """Tell the engine whether this micro-batch closes an accumulation window (ZeRO reduces accordingly)."""
        self._skip_sync = skip_sync
        self.engine.set_gradient_accumulation_boundary(not skip_sync)
        return NO_CONTEXT

    def clip_gradients(self, optimizer: torch.optim.Optimizer, clip_val: float, algorithm: str) -> torch.Tensor | None:
        """Clipping happens inside ``engine.step()`` (config ``gradient_clipping``); returns None."""
        configured = self.engine.gradient_clipping()
        if algorithm != "norm" or configured != clip_val:
            raise ValueError(f"strategy='deepspeed' clips inside its engine with the gradient_clipping it was built "
                             f"with ({configured!r}, by norm); got clip_val={clip_val!r}, algorithm={algorithm!r}. "
                             "Set Trainer(gradient_clip_val=...) before fit and leave it unchanged.")
        return None

    def scale_gradients(self, optimizers: list[torch.optim.Optimizer], factor: float | torch.Tensor) -> None:
        """Scale the window's gradients at the next step (ZeRO holds them, not ``p.grad``: applied through
        the ZeRO optimizer's loss scale)."""
        self._grad_factor = (self._grad_factor or 1.0) * float(factor)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None,
                       **kwargs: Any) -> bool:
        """``engine.step()`` through the precision plugin, with any pending gradient factor applied."""
        if closure is not None:  # before reading the factor: the closure's backward may set it
            closure()
        factor, self._grad_factor = self._grad_factor, None
        if factor is None or factor == 1.0:
            return self.precision.optimizer_step(optimizer, **kwargs)
        # ZeRO divides the gradients by its loss scale inside step(); dividing that scale by ``factor``
        # multiplies the gradients by it (clipping then sees the scaled norm, as it should).
        zero = self.engine.optimizer
        if not hasattr(type(zero), "loss_scale"):
            raise ValueError(f"Rescaling gradients (num_items, uneven data or a short tail window of unknown "
                             f"length) is not supported with DeepSpeed's {type(zero).__name__}; use ZeRO stage 2 "
                             "or 3, or a loader with a length and no num_items.")
        zero.loss_scale = zero.loss_scale / factor
        try:
            return self.precision.optimizer_step(optimizer, **kwargs)
        finally:
            zero.loss_scale = zero.loss_scale * factor

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do: ``engine.step()`` already cleared the gradients."""

    # ---- checkpoints ------------------------------------------------------------------------------
    def module_state_dict(self) -> dict[str, Any]:
        """The full module state dict (gathered on rank 0 under ZeRO-3; collective there)."""
        from strategies.deepspeed_checkpoint import full_state_dict

        return full_state_dict(self)

    def load_module_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        from strategies.deepspeed_checkpoint import load_full_state_dict

        load_full_state_dict(self, state_dict, strict)

    def _full_model_and_optimizers(self, optimizers: list[torch.optim.Optimizer]
                                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Every rank asks (gathering is collective under ZeRO-3); the engine saves the optimizer state."""
        return self.module_state_dict(), []

    def save_checkpoint(self, path: str, *, trainer_state: dict[str, Any], rank_state: dict[str, Any],
                        metadata: dict[str, Any], optimizers: list[torch.optim.Optimizer],
                        safe_serialization: bool = True, writer: Any = None,
                        on_committed: Callable[[], None] | None = None) -> None:
        """The engine's checkpoint (every rank's ZeRO partitions) inside a Kiln checkpoint, plus the full
        weights as ``model.*`` so ``framework.checkpoint.consolidate.load_weights``/``export_safetensors`` read it.

        DeepSpeed's writer is collective, so the save is synchronous even when ``writer`` is given.
        """
        from strategies.deepspeed_checkpoint import save_checkpoint

        save_checkpoint(self, path, trainer_state=trainer_state, rank_state=rank_state, metadata=metadata,
                        safe_serialization=safe_serialization, on_committed=on_committed)

    def load_checkpoint(self, path: str, *, optimizers: list[torch.optim.Optimizer] | None,
                        validate: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the engine (module, ZeRO optimizer partitions, loss scale) from a DeepSpeed checkpoint;
        evaluation (``optimizers=None``) loads the weights only, from any Kiln checkpoint."""
        from strategies.deepspeed_checkpoint import load_checkpoint

        return load_checkpoint(self, path, training=bool(optimizers), validate=validate)


def _import_deepspeed(accelerator: str) -> Any:
    """Import deepspeed for ``accelerator`` (its accelerator is chosen at import, from ``DS_ACCELERATOR``)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if accelerator == "cpu" else "cuda")
    try:
        import deepspeed
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except ImportError as exc:
        raise ImportError(f"strategy='deepspeed' could not import deepspeed ({exc}). Install it with: "
                          f"{INSTALL_HINT}") from exc
    device = get_accelerator().device_name()
    if device != accelerator:
        raise ValueError(f"accelerator={accelerator!r}, but DeepSpeed was set up for {device!r} (DS_ACCELERATOR="
                         f"{os.environ.get('DS_ACCELERATOR')!r}). Set DS_ACCELERATOR={accelerator} before deepspeed "
                         "is first imported, or use accelerator='auto'.")
    if accelerator == "cpu":
        # The shared-memory all-reduce kernel only serves DeepSpeed inference; skip its JIT C++ build
        # (a minute or two, and a compiler) when a training process group starts.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed
