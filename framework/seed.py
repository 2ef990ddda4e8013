"""Global seeding: one seed for python ``random``, numpy and torch, visible to workers and subprocesses.

``seed_everything`` records the seed in the environment under Lightning's names (``PL_GLOBAL_SEED``,
``PL_SEED_WORKERS``), so that components created later (``prepare_dataloader``) and processes started later (the launcher's
other ranks) derive the same data order and worker seeds without a handle being threaded through.
"""

from __future__ import annotations

import hashlib
import operator
import os
import random
import sys
import warnings

import numpy as np
import torch

SEED_ENV = "PL_GLOBAL_SEED"  # Lightning's names: ported scripts and launchers read them
WORKERS_ENV = "PL_SEED_WORKERS"
MIN_SEED = 0
MAX_SEED = 2**32 - 1  # numpy's legacy seeding accepts uint32 only


def _validate_seed(seed: object, source: str) -> int:
    if isinstance(seed, bool):
        raise TypeError(f"{source}={seed!r} is a bool; pass an int in [{MIN_SEED}, {MAX_SEED}].")
    try:
        value = operator.index(seed)
    except TypeError:
        raise TypeError(
            f"{source}={seed!r} is a {type(seed).__name__}; pass an int in [{MIN_SEED}, {MAX_SEED}]."
        ) from None
    if not MIN_SEED <= value <= MAX_SEED:
        raise ValueError(
            f"{source}={value} is out of range; pass an int in [{MIN_SEED}, {MAX_SEED}] "
            f"(e.g. {source}={value % (MAX_SEED + 1)})."
        )
    return value


def seed_everything(seed: int | None = None, workers: bool = True) -> int:
    """Seed python ``random``, numpy's global generator and torch (CPU and every accelerator).

    ``seed=None`` takes ``PL_GLOBAL_SEED`` from the environment, or picks a random seed with a
    warning. ``workers=True`` makes ``prepare_dataloader`` install :func:`worker_init_fn` so python
    ``random`` and numpy are seeded distinctly in every dataloader worker of every rank.
    Returns the seed used.
    """
    if seed is None:
        seed = global_seed()
        if seed is None:
            seed = random.SystemRandom().randint(MIN_SEED, MAX_SEED)
            warnings.warn(
                f"seed_everything(seed=None) with no {SEED_ENV} set: picked seed={seed}. "
                "Pass a seed to make runs reproducible.",
                stacklevel=2,
            )
    else:
        seed = _validate_seed(seed, "seed")

    os.environ[SEED_ENV] = str(seed)
    os.environ[WORKERS_ENV] = "1" if workers else "0"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA/XPU/MPS device (lazily where not yet initialised)
    if "torch_xla" in sys.modules:
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed)
    return seed


def global_seed() -> int | None:
    """The seed recorded by :func:`seed_everything` in this process or a parent, else ``None``."""
    value = os.environ.get(SEED_ENV)
    if value is None:
        return None
    try:
        seed = int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {SEED_ENV}={value!r} is not an int; set it to an int in "
            f"[{MIN_SEED}, {MAX_SEED}] or unset it."
        ) from None
    return _validate_seed(seed, SEED_ENV)


def seed_workers_enabled() -> bool:
    """Whether ``seed_everything(workers=True)`` was used (in this process or a parent)."""
    return os.environ.get(WORKERS_ENV) == "1"


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers, e.g. ``derive_seed(seed, epoch, rank)``.

    Unlike ``seed + epoch`` it makes no two tuples collide in practice ((1, 0) vs (0, 1)).
    """
    data = b"".join(int(p).to_bytes(16, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def worker_init_fn(worker_id: int, rank: int | None = None) -> None:
    """Seed python ``random``, numpy and torch in a dataloader worker from torch's per-worker seed.

    torch gives worker ``w`` the seed ``base_seed + w``; mixing in the global ``rank`` (default: the
    ``RANK`` environment variable) keeps seeds distinct across ranks even when every rank's base seed
    is the same (a loader without its own generator after ``seed_everything``).
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    process_seed = torch.initial_seed()
    sequence = np.random.SeedSequence([process_seed & 0xFFFFFFFF, process_seed >> 32, worker_id, rank])
    np_state, torch_state, py_state = sequence.spawn(3)
    np.random.seed(np_state.generate_state(4))
    torch.manual_seed(int(torch_state.generate_state(1, dtype=np.uint64)[0]))
    random.seed(int.from_bytes(py_state.generate_state(4).tobytes(), "little"))


class SeedingWorkerInit:
    """Picklable ``worker_init_fn``: seeds the worker for ``rank``, then calls the user's function."""

    def __init__(self, rank: int, user_fn=None) -> None:
        self.rank = rank
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        worker_init_fn(worker_id, self.rank)
        if self.user_fn is not None:
            self.user_fn(worker_id)
