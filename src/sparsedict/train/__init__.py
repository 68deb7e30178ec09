"""Training: one loop for every architecture (see :mod:`sparsedict.train.trainer`)."""

from sparsedict.train.config import TrainConfig
from sparsedict.train.data import TensorSource
from sparsedict.train.trainer import Trainer

__all__ = ["TensorSource", "TrainConfig", "Trainer"]
