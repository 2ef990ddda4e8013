"""DeepSpeed's configuration as Kiln builds it: the user's config (dict or JSON file), the ZeRO stage, and the
precision plugin mapped onto the engine's fp16/bf16 sections."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from framework.precision import Precision


def _load_config(config: dict[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"config={os.fspath(config)!r} could not be read as a DeepSpeed JSON config: {exc}. "
                             "Pass a dict or the path of a JSON file.") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config={os.fspath(config)!r} holds a {type(loaded).__name__}; a DeepSpeed config "
                             "is a JSON object.")
        return loaded
    raise TypeError(f"config={config!r} must be a dict, a path to a JSON file, or None.")


def _resolve_stage(stage: int | None, config: dict[str, Any]) -> int:
    configured = config.get("zero_optimization", {}).get("stage")
    if stage is not None and configured is not None and stage != configured:
        raise ValueError(f"stage={stage!r} contradicts config['zero_optimization']['stage']={configured!r}; "
                         "give the stage in one place.")
    stage = stage if stage is not None else configured if configured is not None else 2
    if isinstance(stage, bool) or stage not in (1, 2, 3):
        raise ValueError(f"stage={stage!r} is not a ZeRO stage Kiln supports; use 1 (optimizer state sharded), "
                         "2 (+ gradients) or 3 (+ parameters).")
    return stage


def _merge_precision(config: dict[str, Any], precision: Precision, wanted: dict[str, Any]) -> None:
    """Put the precision's fp16/bf16 section (``wanted``) into ``config``, refusing a config that says otherwise."""
    for key in ("fp16", "bf16"):
        section = config.get(key)
        enabled = bool(section.get("enabled", True)) if isinstance(section, dict) else bool(section)
        if key in config and enabled != (key in wanted):
            raise ValueError(f"The DeepSpeed config's {key}={section!r} contradicts Trainer(precision="
                             f"{precision.name!r}); choose the precision with the Trainer argument only.")
        if key in wanted:
            config[key] = {**wanted[key], **(section if isinstance(section, dict) else {}), "enabled": True}
