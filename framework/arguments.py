"""Checking the Trainer's arguments: every refusal names the argument, the value and the fix."""

from __future__ import annotations

import math
import warnings
from typing import Any

from callbacks.accumulation import GradientAccumulation
from framework.exceptions import MisconfigurationException
from framework.hooks import Callback

DEFAULT_MAX_EPOCHS = 1000


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not valid; use an int >= 1.")
    return value


def optional_positive_int(name: str, value: Any) -> int | None:
    return None if value is None else positive_int(name, value)


def epochs_and_steps(max_epochs: Any, max_steps: Any) -> tuple[float, int]:
    """``(max_epochs, max_steps)`` with Lightning's defaults: neither given → 1000 epochs, with a warning."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < -1:
        raise ValueError(f"max_steps={max_steps!r} is not valid; use an int >= 0, or -1 for no step limit.")
    if max_epochs is None:
        if max_steps == -1:
            warnings.warn(f"Neither max_epochs nor max_steps was set: training stops after {DEFAULT_MAX_EPOCHS} "
                          "epochs. Set max_epochs or max_steps to choose.", stacklevel=3)
            return DEFAULT_MAX_EPOCHS, -1
        return math.inf, max_steps
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < -1:
        raise ValueError(f"max_epochs={max_epochs!r} is not valid; use an int >= 0, or -1/None for no epoch limit.")
    return (math.inf if max_epochs == -1 else max_epochs), max_steps


def clip_value(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"gradient_clip_val={value!r} is not valid; use a finite number >= 0, or None to disable.")
    return float(value) or None


def clip_algorithm(value: Any) -> str:
    if value not in ("norm", "value"):
        raise ValueError(f"gradient_clip_algorithm={value!r} is not valid; use 'norm' (clip the total gradient "
                         "norm) or 'value' (clamp each gradient element).")
    return value


def val_check_interval(value: Any) -> int | float:
    if value is None:
        return 1.0  # Lightning's value for "at each epoch's end" (trainer.val_check_interval reads 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"val_check_interval={value!r} is not valid; use an int number of batches or a float "
                         "fraction of an epoch in (0, 1].")
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"val_check_interval={value!r} is not valid; a float must be a fraction in (0, 1].")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"val_check_interval={value!r} is not valid; an int must be >= 1 batches.")
    return value


def val_every_batches(value: int | float | None, num_batches: int | None) -> int | None:
    """Batches between in-epoch validations (None: only at epoch end)."""
    if value is None or (isinstance(value, float) and value == 1.0):
        return None
    if isinstance(value, float):
        if num_batches is None:
            raise ValueError(f"val_check_interval={value!r} is a fraction of an epoch, but the training dataloader "
                             "has no length; use an int number of batches instead.")
        return max(1, int(num_batches * value))
    if num_batches is not None and value > num_batches:
        raise ValueError(f"val_check_interval={value} is more than the {num_batches} training batches per epoch, so "
                         "validation would never run; use at most that many, or a float fraction of the epoch.")
    return value


def batch_limit(name: str, value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is not valid; use an int number of batches, a float fraction in "
                         "[0, 1], or None for all.")
    if isinstance(value, float):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value!r} is not valid; a float must be a fraction in [0, 1].")
        return None if value == 1.0 else value
    if value < 0:
        raise ValueError(f"{name}={value!r} is not valid; an int must be >= 0 (0 disables the stage).")
    return value


def callbacks(given: Any, accumulate_grad_batches: Any, enable_checkpointing: bool,
              enable_progress_bar: bool) -> tuple[GradientAccumulation, list[Callback]]:
    """Assemble the callback list: RNGCapture first, user callbacks in order, then defaults not given."""
    if given is None:
        given = []
    elif isinstance(given, Callback):
        given = [given]
    if not isinstance(given, (list, tuple)):
        raise TypeError(f"callbacks={given!r} is not valid; pass a Callback or a list of Callback instances.")
    for cb in given:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks contains {cb!r} ({type(cb).__name__}), which is not a callbacks.Callback; "
                            "subclass callbacks.Callback.")
    from callbacks.rng import RNGCapture

    user = list(given)
    accumulation = next((cb for cb in user if isinstance(cb, GradientAccumulation)), None)
    if accumulation is None:
        accumulation = GradientAccumulation(accumulate_grad_batches)
        user.append(accumulation)
    elif accumulate_grad_batches != 1:
        raise ValueError(f"accumulate_grad_batches={accumulate_grad_batches!r} was given together with a "
                         "GradientAccumulation callback; configure accumulation in one place.")
    from callbacks.checkpoint import ModelCheckpoint
    from callbacks.progress import ProgressBar

    result = [cb for cb in user if isinstance(cb, RNGCapture)] or [RNGCapture()]
    result += [cb for cb in user if not isinstance(cb, RNGCapture)]
    has_checkpoint = any(isinstance(cb, ModelCheckpoint) for cb in result)
    if enable_checkpointing and not has_checkpoint:
        result.append(ModelCheckpoint())
    elif not enable_checkpointing and has_checkpoint:
        raise MisconfigurationException("Trainer was configured with `enable_checkpointing=False` but found "
                                        "`ModelCheckpoint` in callbacks list: the two contradict; remove one.")
    has_bar = any(isinstance(cb, ProgressBar) for cb in result)
    if enable_progress_bar and not has_bar:
        result.append(ProgressBar())
    elif not enable_progress_bar and has_bar:
        raise MisconfigurationException("Trainer was configured with `enable_progress_bar=False` but found "
                                        "`ProgressBar` in callbacks list: the two contradict; remove one.")
    return accumulation, result


def non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is not valid; use an int >= 0.")
    return value


def optional_non_negative_int(name: str, value: Any) -> int | None:
    return None if value is None else non_negative_int(name, value)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not valid; use True or False.")
    return value


def max_time(value: Any) -> float | None:
    """``max_time`` in seconds: "DD:HH:MM:SS", a dict of timedelta fields, or a ``timedelta`` (Lightning's forms)."""
    from callbacks.timer import parse_duration

    seconds = parse_duration(value, "max_time")
    if seconds is not None and seconds <= 0:
        raise ValueError(f"max_time={value!r} is not valid; give a duration longer than zero.")
    return seconds


def refuse_unsupported(*, model_registry: Any) -> None:
    if model_registry is not None:
        raise ValueError(f"model_registry={model_registry!r} is not supported: Kiln has no model registry service. "
                         "Save checkpoints with ModelCheckpoint (local paths or fsspec URLs such as s3://) instead.")


def apply_determinism(deterministic: Any, benchmark: Any) -> None:
    """``deterministic`` (True/False/"warn") and ``benchmark`` (cuDNN autotuning) as in Lightning."""
    import torch

    if deterministic not in (None, True, False, "warn"):
        raise ValueError(f"deterministic={deterministic!r} is not valid; use True, False, 'warn' or None.")
    if benchmark not in (None, True, False):
        raise ValueError(f"benchmark={benchmark!r} is not valid; use True, False or None.")
    if deterministic and benchmark:
        warnings.warn("deterministic=True together with benchmark=True: cuDNN autotuning may pick "
                      "non-deterministic kernels, so results can still vary.", stacklevel=3)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=deterministic == "warn")
    if benchmark is not None or deterministic:
        torch.backends.cudnn.benchmark = bool(benchmark) if benchmark is not None else False


def precision_from_plugins(precision: Any, plugins: Any) -> Any:
    """``plugins`` may carry a Precision plugin (Lightning's way); any other plugin is refused by name."""
    from framework.precision import Precision

    if plugins is None:
        return "32-true" if precision is None else precision
    given = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    found = [p for p in given if isinstance(p, Precision)]
    others = [p for p in given if not isinstance(p, Precision)]
    if others:
        raise ValueError(f"plugins={others!r} is not supported: Kiln takes a Precision plugin through plugins= or "
                         "precision=; choose the cluster environment and checkpoint IO through strategy= and "
                         "ModelCheckpoint instead.")
    if len(found) > 1 or (found and precision is not None):
        raise ValueError("Give one precision: either precision=... or one Precision instance in plugins=[...].")
    return found[0] if found else ("32-true" if precision is None else precision)


def one_module(model: Any, module: Any, stage: str) -> Any:
    if model is not None and module is not None and model is not module:
        raise ValueError(f"trainer.{stage}() got both model= and module=; pass the TrainModule once (model=).")
    return model if model is not None else module


def split_datamodule(loaders: Any, datamodule: Any, name: str) -> tuple[Any, Any]:
    """Lightning lets the DataModule arrive in the dataloaders' position (``trainer.fit(model, dm)``)."""
    from framework.datamodule import DataModule

    if isinstance(loaders, DataModule):
        if datamodule is not None:
            raise ValueError(f"{name}= is a DataModule and datamodule= was given too; pass one DataModule.")
        return None, loaders
    return loaders, datamodule


def check_datamodule(datamodule: Any, loaders: dict[str, Any], stage: str) -> None:
    from framework.datamodule import DataModule

    if not isinstance(datamodule, DataModule):
        raise TypeError(f"datamodule={type(datamodule).__name__} is not a framework.DataModule; subclass it.")
    if any(value is not None for value in loaders.values()):
        raise ValueError(f"trainer.{stage}() got dataloaders and a datamodule; pass one of them.")


def check_module(module: Any, stage: str) -> None:
    from framework.module import TrainModule

    if module is None:
        return
    if not isinstance(module, TrainModule):
        raise TypeError(f"trainer.{stage}() needs a framework.TrainModule, got {type(module).__name__}; subclass "
                        "TrainModule (an nn.Module with training_step and configure_optimizers).")
    required = {"fit": ("training_step", "configure_optimizers")}.get(stage, ())
    missing = [name for name in required if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(f"{type(module).__name__} must define {' and '.join(missing)}() for trainer.{stage}().")
    step = {"validate": "validation_step", "test": "test_step"}.get(stage)
    if step and getattr(type(module), step) is getattr(TrainModule, step):
        raise TypeError(f"trainer.{stage}() needs {type(module).__name__}.{step}(batch, batch_idx); define it.")


def reliability_callbacks(nan_policy: Any, on_preempt: Any, user: list[Callback], world_size: int
                          ) -> tuple[Any, list[Callback]]:
    """The nan guard (None for "ignore"), the preemption handler and, on several ranks, the failure report —
    all act at optimizer-step boundaries, after the user's callbacks."""
    from callbacks.nan_policy import nan_guard
    from callbacks.preemption import preemption_callbacks
    from callbacks.rank_failures import RankFailureReport

    guard = nan_guard(nan_policy)
    extra: list[Callback] = [guard] if guard is not None else []
    extra = preemption_callbacks(user + extra, on_preempt)[len(user):]
    if world_size > 1:
        extra.append(RankFailureReport())
    return guard, extra


def summary_and_timer(enable_model_summary: bool, max_time_s: float | None, user: list[Callback]) -> list[Callback]:
    """Lightning's implicit callbacks: a ModelSummary unless one is given, a Timer for ``max_time``."""
    extra: list[Callback] = []
    if enable_model_summary:
        from callbacks.model_summary import ModelSummary

        if not any(isinstance(cb, ModelSummary) for cb in user):
            extra.append(ModelSummary())
    if max_time_s is not None:
        from datetime import timedelta

        from callbacks.timer import Timer

        if any(isinstance(cb, Timer) for cb in user):
            raise ValueError("max_time=... was given together with a Timer callback; set the duration in one place.")
        extra.append(Timer(duration=timedelta(seconds=max_time_s), interval="step"))
    return extra


def profiler(value: Any, dirpath: str) -> Any:
    """``profiler``: None (off, costs nothing), "simple", "advanced", "pytorch", or a Profiler instance."""
    from framework.profiler import resolve_profiler

    return resolve_profiler(value, dirpath)
