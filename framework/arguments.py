"""Checking the Trainer's arguments: every refusal names the argument, the value and the fix."""

from __future__ import annotations

import math
import warnings
from typing import Any

from callbacks.accumulation import GradientAccumulation
from callbacks.base import Callback

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


def val_check_interval(value: Any) -> int | float | None:
    if value is None:
        return None
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
    result = [cb for cb in user if isinstance(cb, RNGCapture)] or [RNGCapture()]
    result += [cb for cb in user if not isinstance(cb, RNGCapture)]
    names = {type(cb).__name__ for cb in result}
    if enable_checkpointing and "ModelCheckpoint" not in names:
        from callbacks.checkpoint import ModelCheckpoint

        result.append(ModelCheckpoint())
    elif not enable_checkpointing and "ModelCheckpoint" in names:
        raise ValueError("enable_checkpointing=False contradicts the ModelCheckpoint in callbacks; remove one.")
    if enable_progress_bar and "ProgressBar" not in names:
        from callbacks.progress import ProgressBar

        result.append(ProgressBar())
    elif not enable_progress_bar and "ProgressBar" in names:
        raise ValueError("enable_progress_bar=False contradicts the ProgressBar in callbacks; remove one.")
    return accumulation, result


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
