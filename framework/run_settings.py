"""Trainer arguments that reshape a run: fast_dev_run, barebones, overfit_batches and the limits they set.

Lightning's meanings: ``fast_dev_run=n`` runs n batches of every stage once, with no sanity check,
loggers or checkpoints; ``barebones=True`` turns off everything that costs speed and refuses settings
that would turn it back on; ``overfit_batches`` trains and validates on the same first batches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from framework import arguments


@dataclass
class RunSettings:
    fast_dev_run: int
    max_epochs: int | None
    max_steps: int
    limits: tuple[Any, Any, Any, Any]
    overfit_batches: int | float
    num_sanity_val_steps: int
    log_every_n_steps: int
    val_check_interval: int | float | None
    check_val_every_n_epoch: int | None
    logger: Any
    enable_checkpointing: bool
    enable_progress_bar: bool
    enable_model_summary: bool


def run_settings(*, fast_dev_run: Any, barebones: Any, max_epochs: Any, max_steps: Any, limits: tuple,
                 overfit_batches: Any, num_sanity_val_steps: Any, log_every_n_steps: Any, val_check_interval: Any,
                 check_val_every_n_epoch: Any, logger: Any, enable_checkpointing: Any, enable_progress_bar: Any,
                 enable_model_summary: Any) -> RunSettings:
    """Validate the run-shaping arguments and apply fast_dev_run/barebones/overfit_batches to them."""
    if isinstance(fast_dev_run, bool):
        fast = int(fast_dev_run)
    elif isinstance(fast_dev_run, int) and fast_dev_run >= 0:
        fast = fast_dev_run
    else:
        raise ValueError(f"fast_dev_run={fast_dev_run!r} is not valid; use True (one batch), False, or an int >= 0.")
    if not isinstance(barebones, bool):
        raise ValueError(f"barebones={barebones!r} is not valid; use True or False.")
    if barebones:
        _refuse_in_barebones(fast_dev_run=fast, logger=logger, enable_checkpointing=enable_checkpointing,
                             enable_progress_bar=enable_progress_bar, enable_model_summary=enable_model_summary,
                             log_every_n_steps=log_every_n_steps, num_sanity_val_steps=num_sanity_val_steps)
        logger, enable_checkpointing, enable_progress_bar, enable_model_summary = False, False, False, False
        log_every_n_steps, num_sanity_val_steps = 0, 0
    limits = tuple(arguments.batch_limit(name, value) for name, value in zip(
        ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"), limits))
    overfit = _overfit(overfit_batches)
    if overfit:
        limits = (overfit, overfit, *limits[2:])
    sanity = 2 if num_sanity_val_steps is None else num_sanity_val_steps
    if isinstance(sanity, bool) or not isinstance(sanity, int) or sanity < -1:
        raise ValueError(f"num_sanity_val_steps={num_sanity_val_steps!r} is not valid; use an int >= 0 (batches per "
                         "validation dataloader before training), or -1 for all of them.")
    every = 50 if log_every_n_steps is None else log_every_n_steps
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"log_every_n_steps={log_every_n_steps!r} is not valid; use an int >= 1 (0 turns step "
                         "logging off).")
    settings = RunSettings(
        fast_dev_run=fast, max_epochs=max_epochs, max_steps=max_steps, limits=limits, overfit_batches=overfit,
        num_sanity_val_steps=sanity, log_every_n_steps=every,
        val_check_interval=arguments.val_check_interval(val_check_interval),
        check_val_every_n_epoch=arguments.optional_positive_int("check_val_every_n_epoch", check_val_every_n_epoch),
        logger=True if logger is None else logger,
        enable_checkpointing=_flag("enable_checkpointing", enable_checkpointing),
        enable_progress_bar=_flag("enable_progress_bar", enable_progress_bar),
        enable_model_summary=_flag("enable_model_summary", enable_model_summary))
    if fast:
        _apply_fast_dev_run(settings, fast)
    return settings


def _apply_fast_dev_run(s: RunSettings, n: int) -> None:
    if not s.overfit_batches:
        s.limits = (n, n, n, n)
    else:
        s.limits = (*s.limits[:2], n, n)
    s.max_steps, s.max_epochs, s.num_sanity_val_steps = n, 1, 0
    s.val_check_interval, s.check_val_every_n_epoch = 1.0, 1
    # As in Lightning, checkpoint callbacks stay (trainer.checkpoint_callback exists) and skip every save.
    from framework.loggers.base import Logger

    if s.logger is True or (s.logger and isinstance(s.logger, (Logger, list, tuple))):
        from framework.loggers.dummy import DummyLogger

        s.logger = DummyLogger()  # Lightning's rule: the loggers are swapped for one that records nothing
    s.log_every_n_steps = 1
    warnings.warn(f"fast_dev_run={n}: every stage runs {n} batch(es) once; loggers and checkpoints are off and "
                  "there is no sanity check.", stacklevel=4)


def _overfit(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            isinstance(value, float) and value > 1):
        raise ValueError(f"overfit_batches={value!r} is not valid; use an int number of batches, a float fraction "
                         "in [0, 1], or 0 to turn it off.")
    return value


def _flag(name: str, value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not valid; use True or False.")
    return value


def _refuse_in_barebones(**given: Any) -> None:
    """barebones=True turns these off; asking for them at the same time is a contradiction, not a preference."""
    on = {
        "fast_dev_run": given["fast_dev_run"] != 0,
        "logger": given["logger"] not in (None, False),
        "enable_checkpointing": bool(given["enable_checkpointing"]),
        "enable_progress_bar": bool(given["enable_progress_bar"]),
        "enable_model_summary": bool(given["enable_model_summary"]),
        "log_every_n_steps": given["log_every_n_steps"] not in (None, 0),
        "num_sanity_val_steps": given["num_sanity_val_steps"] not in (None, 0),
    }
    for name, enabled in on.items():
        if enabled:
            raise ValueError(f"Trainer(barebones=True, {name}={given[name]!r}): barebones mode turns {name} off "
                             "because it costs speed; remove one of the two.")
