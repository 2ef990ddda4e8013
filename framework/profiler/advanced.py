"""AdvancedProfiler: a ``cProfile`` profile per action, reported with ``pstats`` (cumulative time)."""

from __future__ import annotations

import cProfile
import io
import os
import pstats

from framework.profiler.base import Profiler


class AdvancedProfiler(Profiler):
    """Function-level statistics per action; ``line_count_restriction`` limits each action's listing
    (an int: that many lines; a float in (0, 1]: that fraction of them)."""

    def __init__(self, dirpath: str | os.PathLike | None = None, filename: str | None = None,
                 line_count_restriction: float = 1.0, dump_stats: bool = False) -> None:
        super().__init__(dirpath=dirpath, filename=filename)
        if isinstance(line_count_restriction, bool) or not isinstance(line_count_restriction, (int, float)) \
                or line_count_restriction <= 0:
            raise ValueError(f"`line_count_restriction` must be a number > 0, got {line_count_restriction!r}.")
        self.line_count_restriction = line_count_restriction
        self.dump_stats = dump_stats
        self.profiled_actions: dict[str, cProfile.Profile] = {}
        self._active: list[str] = []

    def start(self, action_name: str) -> None:
        # One cProfile profiler may be active at a time (Python 3.12 refuses a second), so a nested action
        # pauses the enclosing one: each function call is counted in the innermost action only.
        if self._active:
            self.profiled_actions[self._active[-1]].disable()
        profiler = self.profiled_actions.get(action_name)
        if profiler is None:
            profiler = self.profiled_actions[action_name] = cProfile.Profile()
        self._active.append(action_name)
        profiler.enable()

    def stop(self, action_name: str) -> None:
        if action_name not in self._active:
            raise ValueError(f"Attempting to stop recording an action ({action_name}) which was never started.")
        self.profiled_actions[action_name].disable()
        self._active.remove(action_name)
        if self._active:
            self.profiled_actions[self._active[-1]].enable()

    def summary(self) -> str:
        reports = {}
        for action, profiler in self.profiled_actions.items():
            if self.dump_stats and self.dirpath:
                path = self.report_path(action, extension=".prof")
                os.makedirs(self.dirpath, exist_ok=True)
                profiler.dump_stats(path)
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats("cumulative").print_stats(
                self.line_count_restriction)
            reports[action] = stream.getvalue()
        return self._stats_to_str(reports) if reports else ""

    def reset(self) -> None:
        self.profiled_actions, self._active = {}, []
