"""Config-driven command line (``kiln[cli]``): ``KilnCLI``, also importable as ``LightningCLI``.

``from framework.cli import LightningCLI`` replaces ``from pytorch_lightning.cli import LightningCLI``.
jsonargparse is imported only when a CLI is built.
"""

from framework.cli.core import SUBCOMMANDS, KilnCLI, LightningCLI, instantiate_class
from framework.cli.save_config import SaveConfigCallback

__all__ = ["SUBCOMMANDS", "KilnCLI", "LightningCLI", "SaveConfigCallback", "instantiate_class"]
