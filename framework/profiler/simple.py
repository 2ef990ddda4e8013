"""SimpleProfiler: wall time per action — mean, calls, total and share of the run, as Lightning's table."""

from __future__ import annotations

import os
import time
from collections import defaultdict

from framework.profiler.base import Profiler


class SimpleProfiler(Profiler):
    """Records each action's durations; ``extended`` adds the call count and percentage columns."""

    def __init__(self, dirpath: str | os.PathLike | None = None, filename: str | None = None,
                 extended: bool = True) -> None:
        super().__init__(dirpath=dirpath, filename=filename)
        self.extended = extended
        self.current_actions: dict[str, float] = {}
        self.recorded_durations: dict[str, list[float]] = defaultdict(list)
        self.start_time = time.perf_counter()

    def start(self, action_name: str) -> None:
        if action_name in self.current_actions:
            raise ValueError(f"Attempted to start {action_name} which has already started.")
        self.current_actions[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        end = time.perf_counter()
        if action_name not in self.current_actions:
            raise ValueError(f"Attempting to stop recording an action ({action_name}) which was never started.")
        self.recorded_durations[action_name].append(end - self.current_actions.pop(action_name))

    def summary(self) -> str:
        if not self.recorded_durations:
            return ""
        sep = os.linesep
        title = (f"{self._stage.upper()} " if self._stage else "") + "Profiler Report" + sep
        width = max(len(k) for k in self.recorded_durations)
        total_time = time.perf_counter() - self.start_time

        def row(*cells: str) -> str:
            action, rest = cells[0], cells[1:]
            return f"{sep}|  {action:<{width}s}\t|" + "".join(f"  {c:<15}\t|" for c in rest)

        stats = [(name, sum(d) / len(d), len(d), sum(d)) for name, d in self.recorded_durations.items()]
        if self.extended:
            header = row("Action", "Mean duration (s)", "Num calls", "Total time (s)", "Percentage %")
        else:
            header = row("Action", "Mean duration (s)", "Total time (s)")
        line = sep + "-" * len(header.expandtabs())
        out = title + line + header + line
        if self.extended:
            out += row("Total", "-", str(sum(s[2] for s in stats)), f"{total_time:.5}", "100 %") + line
            for name, mean, calls, total in sorted(stats, key=lambda s: s[3], reverse=True):
                out += row(name, f"{mean:.5}", str(calls), f"{total:.5}", f"{100.0 * total / total_time:.5}")
        else:
            for name, mean, _, total in sorted(stats, key=lambda s: s[1], reverse=True):
                out += row(name, f"{mean:.5}", f"{total:.5}")
        return out + line + sep

    def reset(self) -> None:
        self.current_actions = {}
        self.recorded_durations = defaultdict(list)
        self.start_time = time.perf_counter()
