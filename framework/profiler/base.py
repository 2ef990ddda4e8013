"""The Profiler base (Lightning's interface) and the no-op PassThroughProfiler that is on by default.

The Trainer wraps its actions in ``trainer.profiler.profile(name)``. With profiling off that is a shared
``nullcontext``: no timing, no allocation, no Python frame beyond the ``with``.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, TextIO

_NULL = contextlib.nullcontext()


class Profiler(ABC):
    """Base for profilers: ``start``/``stop`` an action by name, ``summary()`` the report.

    ``dirpath``/``filename``: when ``filename`` is set, ``describe()`` writes the report to
    ``dirpath/<stage>-<filename>[-<rank>].txt`` (``dirpath`` defaults to the Trainer's log dir);
    otherwise it prints the report on local rank 0. ``enabled`` is False only for the no-op default, so a
    caller can skip building action names (``f"[Callback]{key}.{hook}"``) when nothing records them.
    """

    enabled = True

    def __init__(self, dirpath: str | os.PathLike | None = None, filename: str | None = None) -> None:
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"`dirpath` must be a path or None, got {dirpath!r}.")
        if filename is not None and not isinstance(filename, str):
            raise TypeError(f"`filename` must be a str or None, got {filename!r}.")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.filename = filename
        self._fallback_dirpath: str | None = None  # the Trainer's root dir, for profilers it made from a name
        self._output_file: TextIO | None = None
        self._local_rank: int | None = None
        self._stage: str | None = None

    @abstractmethod
    def start(self, action_name: str) -> None:
        """Start recording ``action_name``."""

    @abstractmethod
    def stop(self, action_name: str) -> None:
        """Stop recording ``action_name`` (started earlier)."""

    def summary(self) -> str:
        """The report of everything recorded so far."""
        return ""

    @contextlib.contextmanager
    def profile(self, action_name: str) -> Iterator[str]:
        """``with profiler.profile("name"):`` records the block as one call of the action."""
        try:
            self.start(action_name)
            yield action_name
        finally:
            self.stop(action_name)

    def setup(self, stage: str, local_rank: int | None = None, log_dir: str | None = None) -> None:
        """Called by the Trainer as a stage starts; ``local_rank`` is None in a single-process run."""
        self._stage = stage
        self._local_rank = local_rank
        self.dirpath = self.dirpath or log_dir or self._fallback_dirpath

    def teardown(self, stage: str | None) -> None:
        """Close the report file."""
        if self._output_file is not None:
            self._output_file.close()
            self._output_file = None

    def describe(self) -> None:
        """Write (or print) the report, then start afresh; the Trainer calls it as a stage ends (before or
        after ``teardown``: the recorded data survive ``teardown`` until described)."""
        report = self.summary()
        if report:
            path = self.report_path()
            if path is not None:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                with open(path, "a") as f:
                    f.write(report)
            elif self.local_rank == 0:
                print(report, flush=True)
        self.reset()
        self.teardown(self._stage)

    def reset(self) -> None:
        """Forget what was recorded (after ``describe``); subclasses with records override it."""
        return None

    def report_path(self, action_name: str | None = None, extension: str = ".txt") -> str | None:
        """Where ``describe`` writes: ``dirpath/[stage-]filename[-rank][-action]<extension>``, or None."""
        if not (self.filename and self.dirpath):
            return None
        parts = [p for p in (self._stage, self.filename) if p]
        if self._local_rank is not None:
            parts.append(str(self._local_rank))
        if action_name is not None:
            parts.append(action_name)
        return os.path.join(self.dirpath, "-".join(parts) + extension)

    @property
    def local_rank(self) -> int:
        return 0 if self._local_rank is None else self._local_rank

    def _stats_to_str(self, stats: dict[str, str]) -> str:
        stage = f"{self._stage.upper()} " if self._stage is not None else ""
        lines = [stage + "Profiler Report"]
        for action, value in stats.items():
            header = f"Profile stats for: {action}"
            if self._local_rank is not None:
                header += f" rank: {self._local_rank}"
            lines += [header, value]
        return os.linesep.join(lines)


class PassThroughProfiler(Profiler):
    """Profiling off (the default): every call is a no-op."""

    enabled = False

    def start(self, action_name: str) -> None:
        pass

    def stop(self, action_name: str) -> None:
        pass

    def profile(self, action_name: str) -> Any:  # type: ignore[override]
        return _NULL

    def describe(self) -> None:
        pass
