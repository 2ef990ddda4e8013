"""``lightning.pytorch.core``'s public names at the renamed path (``from framework.core import TrainModule``),
so ported imports need no further edits."""

from framework.datamodule import DataModule
from framework.module import TrainModule

__all__ = ["DataModule", "TrainModule"]
