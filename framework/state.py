"""DistributedState: the process topology, shared by every object in a process.

All instances share one ``__dict__`` (the shared-state pattern), so any component can ask
``DistributedState().process_index`` without threading a handle through. The Strategy fills it in
when it sets up the process group; until then it describes a single process on the CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_KNOWN = (
    "num_processes",
    "process_index",
    "local_process_index",
    "device",
    "backend",
    "initialized",
    "is_main_process",
    "is_local_main_process",
)


class DistributedState:
    """Process topology: rank, world size, device and backend of this process (contract)."""

    _shared_state: dict[str, Any] = {}

    def __init__(self, **overrides: Any) -> None:
        self.__dict__ = self._shared_state
        if not self._shared_state.get("initialized", False) or overrides:
            if not self._shared_state.get("initialized", False):
                self._shared_state.update(self._from_environment())
            self._shared_state.update(overrides)
            self._shared_state["initialized"] = True

    @staticmethod
    def _from_environment() -> dict[str, Any]:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return {
            "num_processes": world,
            "process_index": rank,
            "local_process_index": local,
            "device": torch.device("cpu"),
            "backend": None,
        }

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    @classmethod
    def _reset_state(cls) -> None:
        """Forget the topology (tests, or several trainers in one script)."""
        cls._shared_state.clear()

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup failed, i.e. the shared dict lacks ``name``.
        if name in _KNOWN:
            raise AttributeError(
                f"`DistributedState` object has no attribute `{name}`. This happens if "
                "`DistributedState._reset_state()` was called and no DistributedState was created "
                "since. Create one again with `DistributedState()` (a Trainer does this in fit)."
            )
        raise AttributeError(f"'DistributedState' object has no attribute '{name}'")

    def __repr__(self) -> str:
        if not self.__dict__:
            return "DistributedState(<reset>)"
        return (
            f"DistributedState(num_processes={self.num_processes}, process_index={self.process_index}, "
            f"local_process_index={self.local_process_index}, device={self.device}, backend={self.backend})"
        )
