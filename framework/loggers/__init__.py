"""Experiment loggers: TensorBoard, CSV and MLflow (optional extra), with Lightning's arguments.

``from framework.loggers import TensorBoardLogger, CSVLogger, MLFlowLogger, Logger``. Backends
(tensorboard, mlflow) are imported when a logger first writes, not here.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from framework.loggers.base import Logger

_LAZY = {
    "TensorBoardLogger": "framework.loggers.tensorboard",
    "CSVLogger": "framework.loggers.csv_logs",
    "MLFlowLogger": "framework.loggers.mlflow",
    "DummyLogger": "framework.loggers.dummy",
}

__all__ = ["Logger", "resolve_loggers", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'framework.loggers' has no attribute {name!r}")


def resolve_loggers(logger: Any, default_root_dir: str | os.PathLike | None) -> list[Logger]:
    """Turn the Trainer's ``logger=`` argument into a list of loggers.

    True → a TensorBoardLogger under ``default_root_dir`` (the working directory when None), as in
    Lightning; False/None → no logging; a Logger → ``[logger]``; a list/tuple of Loggers → that list.
    """
    if logger is True:
        from framework.loggers.tensorboard import TensorBoardLogger

        return [TensorBoardLogger(default_root_dir if default_root_dir is not None else os.getcwd())]
    if logger is False or logger is None:
        return []
    if isinstance(logger, Logger):
        return [logger]
    if isinstance(logger, (list, tuple)):
        for item in logger:
            if not isinstance(item, Logger):
                raise TypeError(
                    f"`logger` list holds {item!r}, which is not a framework.loggers.Logger. Pass "
                    "Logger instances such as TensorBoardLogger(...) or CSVLogger(...)."
                )
        return list(logger)
    raise TypeError(
        f"`logger` must be True, False, None, a Logger or a list of Loggers, got {logger!r}. "
        "Pass e.g. logger=CSVLogger('runs') or logger=False to disable logging."
    )


def log_run_start(loggers: list[Logger], module: Any, datamodule: Any = None) -> None:
    """What Lightning does for loggers as a run starts: log the initial hyperparameters (of the module and
    datamodule that called ``save_hyperparameters(logger=True)``), the graph, then save."""
    if not loggers:
        return
    from framework.hparams import hparams_for_logging

    params = hparams_for_logging(module, datamodule)
    for logger in loggers:
        if params is not None:
            logger.log_hyperparams(params)
        logger.log_graph(module)
        logger.save()
