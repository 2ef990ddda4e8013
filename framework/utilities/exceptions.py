"""``lightning.pytorch.utilities.exceptions`` at the renamed path (``from framework.utilities.exceptions import
MisconfigurationException``): the same class as ``framework.exceptions``, so ``except`` clauses catch what Kiln raises."""

from framework.exceptions import MisconfigurationException

__all__ = ["MisconfigurationException"]
