"""``DummyLogger``: what ``trainer.logger`` is under ``fast_dev_run`` when logging was on (Lightning's rule), so
code such as ``self.logger.experiment.add_histogram(...)`` runs and writes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from framework.loggers.base import Logger


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


class DummyExperiment:
    """An experiment whose every method accepts any arguments and does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return _nothing

    def __getitem__(self, index: Any) -> DummyExperiment:
        return self

    def __setitem__(self, *args: Any) -> None:
        pass


class DummyLogger(Logger):
    """A logger that records nothing; any method a backend logger has can be called on it (and on its
    ``experiment``) without effect."""

    def __init__(self) -> None:
        self._experiment = DummyExperiment()

    @property
    def experiment(self) -> DummyExperiment:
        return self._experiment

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    def __getitem__(self, index: int) -> DummyLogger:  # self.logger[0].experiment...
        return self

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("__"):
            raise AttributeError(name)
        return _nothing
