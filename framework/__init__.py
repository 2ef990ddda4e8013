"""Kiln's core: TrainModule, Trainer, seeding and the process topology."""

from framework.module import TrainModule
from framework.seed import seed_everything
from framework.state import DistributedState
from framework.trainer import Trainer

__all__ = ["TrainModule", "Trainer", "seed_everything", "DistributedState"]
