"""KilnArgumentParser: jsonargparse's parser with Kiln's groups and an error that names the closest key.

Imported only when a CLI is built, so ``import framework`` never pays for jsonargparse.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser


class KilnArgumentParser(ArgumentParser):
    """Adds ``--config`` (several files, merged in order) and the optimizer/scheduler groups."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("-c", "--config", action=ActionConfigFile,
                          help="YAML config file(s); later files and flags override earlier ones")
        self.optimizer_keys: list[str] = []
        self.scheduler_keys: list[str] = []

    def add_optimizer_args(self, nested_key: str = "optimizer") -> None:
        import torch

        self.add_subclass_arguments((torch.optim.Optimizer,), nested_key, skip={"params"}, instantiate=False,
                                    required=False, fail_untyped=False)
        self.optimizer_keys.append(nested_key)

    def add_lr_scheduler_args(self, nested_key: str = "lr_scheduler") -> None:
        import torch

        bases = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.add_subclass_arguments(bases, nested_key, skip={"optimizer"}, instantiate=False, required=False,
                                    fail_untyped=False)
        self.scheduler_keys.append(nested_key)

    def known_keys(self) -> list[str]:
        """Every dotted key this parser (and its subcommands) accepts, for suggestions."""
        keys: list[str] = []
        for action in self._actions:
            if getattr(action, "dest", None) not in (None, "help"):
                keys.append(action.dest)
            for sub in (getattr(action, "choices", None) or {}).values() if isinstance(
                    getattr(action, "choices", None), dict) else ():
                if isinstance(sub, KilnArgumentParser):
                    keys.extend(sub.known_keys())
        return sorted(set(keys))

    def error(self, message: str, ex: Exception | None = None) -> Any:
        hint = closest_key_hint(message, self.known_keys())
        return super().error(message + hint, ex)


_KEYISH = re.compile(r"(?:--|['\"])([A-Za-z_][\w.]*)")


def closest_key_hint(message: str, keys: list[str]) -> str:
    """' Did you mean --trainer.max_epochs?' for the first unknown key in ``message`` with a close match."""
    known = set(keys)
    for token in _KEYISH.findall(message):
        if token in known:
            continue
        match = difflib.get_close_matches(token, keys, n=1, cutoff=0.6)
        if not match and "." in token:  # a group key: compare within the group
            group, leaf = token.rsplit(".", 1)
            leaves = [k.rsplit(".", 1)[1] for k in keys if k.startswith(group + ".")]
            near = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.6)
            match = [f"{group}.{near[0]}"] if near else []
        if match:
            return f"\nUnknown key {token!r}: did you mean '--{match[0]}'?"
    return ""
