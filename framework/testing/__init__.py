"""Testing helpers for Kiln users (and Kiln itself): real multi-process jobs, hardware skips, a tiny
module with random data, and bit-identity assertions.

- :mod:`~framework.testing.distributed`  ``run_distributed``: real jobs with torchrun's environment
- :mod:`~framework.testing.requirements` ``require_*``: skip a test when hardware or a package is missing
- :mod:`~framework.testing.boring`       ``BoringModule``, ``RandomDataset``, ``RandomIterableDataset``
- :mod:`~framework.testing.compare`      ``assert_modules_equal``, ``assert_checkpoints_equal``,
  ``assert_state_equal``: fail with the entry that differs and by how much
"""

from framework.testing.boring import BoringModule, RandomDataset, RandomIterableDataset
from framework.testing.compare import (
    assert_checkpoints_equal,
    assert_modules_equal,
    assert_state_equal,
    state_differences,
)
from framework.testing.distributed import DistributedJobError, RankResult, run_distributed
from framework.testing.requirements import (
    require_bf16,
    require_cuda,
    require_deepspeed,
    require_distributed,
    require_fp16,
    require_multi_device,
    require_xla,
)

__all__ = [
    "DistributedJobError", "RankResult", "run_distributed", "require_cuda", "require_multi_device",
    "require_fp16", "require_bf16", "require_deepspeed", "require_xla", "require_distributed",
    "BoringModule", "RandomDataset", "RandomIterableDataset",
    "assert_modules_equal", "assert_checkpoints_equal", "assert_state_equal", "state_differences",
]
