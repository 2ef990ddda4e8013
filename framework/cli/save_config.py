"""SaveConfigCallback: the CLI's resolved configuration beside the logs and inside every checkpoint.

Kept free of jsonargparse imports: the config arrives already rendered as YAML text by the CLI.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from framework.hooks import Callback

CHECKPOINT_KEY = "cli_config"


def _dump_with_nones(parser: Any, config: Any) -> str:
    """The YAML of ``config`` with None values kept (a complete record); the keyword changed in jsonargparse 4.49."""
    from importlib.metadata import version

    major, minor = (int(part) for part in version("jsonargparse").split(".")[:2])
    keyword = "skip_unset" if (major, minor) >= (4, 49) else "skip_none"
    return parser.dump(config, **{keyword: False})


class SaveConfigCallback(Callback):
    """Writes ``config.yaml`` into ``trainer.log_dir`` at the first ``setup`` (rank 0) and adds the
    resolved config to every checkpoint under ``"cli_config"`` (a plain dict, stored as data).

    Lightning's arguments: ``config_filename``, ``overwrite`` (an existing file is an error unless
    True, so a second run cannot silently replace the first run's record), ``save_to_log_dir``.
    ``multifile`` is refused: the resolved config is always written as one file.
    """

    def __init__(self, parser: Any, config: Any, config_filename: str = "config.yaml", overwrite: bool = False,
                 multifile: bool = False, save_to_log_dir: bool = True) -> None:
        if multifile:
            raise ValueError("SaveConfigCallback(multifile=True) is not supported in Kiln: the resolved config is "
                             "written as one file; pass multifile=False")
        self.parser = parser
        self.config = config
        self.config_filename = config_filename
        self.overwrite = overwrite
        self.save_to_log_dir = save_to_log_dir
        self.already_saved = False
        self.config_yaml: str = _dump_with_nones(parser, config)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir:
            path = os.path.join(trainer.log_dir, self.config_filename)
            exists = trainer.strategy.broadcast(os.path.isfile(path) if trainer.is_global_zero else False)
            if exists and not self.overwrite:
                raise RuntimeError(
                    f"SaveConfigCallback: {path} already exists; refusing to overwrite a previous run's config. "
                    "Delete it, pass save_config_kwargs={'overwrite': True}, or save_config_callback=None.")
            if trainer.is_global_zero:
                os.makedirs(trainer.log_dir, exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(self.config_yaml)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Override to store the config elsewhere too (e.g. a logger); runs on rank 0 only."""

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = yaml.safe_load(self.config_yaml)
