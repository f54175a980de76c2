"""The training engine shared by all tasks: config, optimizer/schedule, checkpoints, distributed,
data loading, mixing, EMA, logging and the :class:`Trainer` loop driving a :class:`Task`."""

from mvitv2.engine.checkpoint import find_resume, read_training_checkpoint, save_checkpoint
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.data import BadSample, EpochSampler, SeededDataset, build_loader
from mvitv2.engine.distributed import DistInfo, init_distributed, sync_batchnorm
from mvitv2.engine.metrics import evaluate_classifier
from mvitv2.engine.mixing import MixCriterion
from mvitv2.engine.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups
from mvitv2.engine.task import Task
from mvitv2.engine.trainer import Trainer, TrainingStopped, to_device

__all__ = [
    "BadSample",
    "DistInfo",
    "EpochSampler",
    "MixCriterion",
    "SeededDataset",
    "Task",
    "TrainConfig",
    "Trainer",
    "TrainingStopped",
    "WarmupCosine",
    "build_loader",
    "build_optimizer",
    "build_scheduler",
    "evaluate_classifier",
    "find_resume",
    "init_distributed",
    "read_training_checkpoint",
    "param_groups",
    "save_checkpoint",
    "sync_batchnorm",
    "to_device",
]
