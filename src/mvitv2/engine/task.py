"""The interface between the generic :class:`~mvitv2.engine.trainer.Trainer` and a task.

A task (image classification, detection, video) says how to build its model and data, how to get
a loss from a batch, and how to evaluate. The trainer owns everything else: devices, DDP,
precision, optimizer, schedule, checkpoints, logging, resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mvitv2.engine.config import TrainConfig
from mvitv2.engine.distributed import DistInfo


class Task(ABC):
    """What a task must provide. Subclasses keep their state (class names, ...) on ``self``.

    Args:
        cfg: the run's config; task-specific options live in ``cfg.data``.
    """

    #: metric of :meth:`evaluate` that selects ``best.pt`` (higher is better).
    primary_metric: str = "top1"
    #: samples per forward in the evaluation during training; None: the run's ``batch_size``.
    eval_batch_size: int | None = None

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """Train and validation datasets (validation may be None). Called before :meth:`build_model`
        so the model can be sized from the data (number of classes). Samples may raise
        :class:`mvitv2.engine.data.BadSample` to be skipped and counted."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model to train, on CPU, in float32 (the trainer moves and wraps it)."""

    def init_weights(self, model: nn.Module, source: str) -> Any:
        """Initialise the freshly built ``model`` from the checkpoint file ``source`` (the
        config's ``finetune``); the optimizer starts fresh.

        The default is the strict, format-aware :func:`mvitv2.load_checkpoint`: official /
        SlowFast ``.pyth``, timm, torchvision, detectron2, safetensors and mvitv2 training
        checkpoints; the classifier reset for another class count, rel-pos and absolute position
        tables resized for another input size; anything else that does not fit raises
        :class:`mvitv2.weights.CheckpointMismatchError` naming the tensors. Override it for a
        model that is not a plain MViT (a detector initialises its backbone, a video model may
        inflate image kernels).

        Returns:
            a report of what was loaded; its ``str()`` is logged.
        """
        from mvitv2.weights import load_checkpoint

        return load_checkpoint(model, source, strict=True)

    def collate_fn(self) -> Callable[[list], Any] | None:
        """Batch collation (None: ``default_collate``)."""
        return None

    @abstractmethod
    def training_loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """Loss of one (device-resident) batch and extra scalars to log (may be empty).

        Called under autocast; ``model`` may be DDP/compiled: only call it, do not inspect it.
        """

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader, dist: DistInfo) -> dict[str, float]:
        """Metrics over the whole validation set. ``loader`` yields this process's shard (device
        not applied: move batches with :func:`mvitv2.engine.trainer.to_device`); combine shards
        with ``dist.all_reduce_sum`` / ``dist.all_gather_object`` so every process returns the
        same numbers. Batches may be None (all samples skipped)."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """Plain values stored with every checkpoint (class names, preprocessing, ...)."""
        return {}

    def upgrade_meta(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """A saved checkpoint's ``meta`` in the schema :meth:`checkpoint_meta` writes now, so
        that ``--resume auto`` compares a checkpoint written before a schema change with this
        run like with like. The default: the ``meta`` as saved.

        Args:
            checkpoint: the training checkpoint (``model``, ``config``, ``meta``; the tensors may
                be memory-mapped: read keys, not values).
        """
        return dict(checkpoint.get("meta") or {})

    def describe_data(self, ds: Dataset) -> str:
        """How much ``ds`` holds, for the run's banner (e.g. ``"40 samples"``)."""
        return f"{len(ds)} samples"

    def batch_size(self, batch: Any) -> int:
        """Number of samples in a batch (for images/s)."""
        first = batch[0] if isinstance(batch, list | tuple) else batch
        return len(first)
