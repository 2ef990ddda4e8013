"""Lightning's ``lightning.pytorch.utilities`` names that Kiln has, at the renamed import path
(``from framework.utilities import rank_zero_only``), so ported code needs no further edits."""

from framework.batch_transfer import move_data_to_device
from framework.hparams import AttributeDict
from framework.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_only, rank_zero_warn

__all__ = ["AttributeDict", "move_data_to_device", "rank_zero_debug", "rank_zero_info", "rank_zero_only",
           "rank_zero_warn"]
