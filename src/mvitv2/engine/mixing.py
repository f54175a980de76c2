"""Mixup / CutMix on batches with label smoothing, as soft targets (images and videos).

Built on ``torchvision.transforms.v2.MixUp`` / ``CutMix``; label smoothing is applied to the
one-hot targets before mixing, as in timm's ``Mixup``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2


class MixCriterion:
    """Turns ``(inputs, labels)`` into mixed inputs and soft targets, and scores logits against them.

    Args:
        num_classes: classifier outputs.
        mixup: mixup alpha (0: off).
        cutmix: cutmix alpha (0: off).
        prob: probability of mixing a batch.
        switch_prob: probability of cutmix rather than mixup when both are on.
        label_smoothing: smoothing of the one-hot targets.
    """

    def __init__(
        self,
        num_classes: int,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        self.num_classes, self.prob, self.label_smoothing = num_classes, prob, label_smoothing
        # The targets given to the ops are (smoothed) probabilities: no class count needed.
        ops: list[v2.Transform] = []
        if mixup > 0:
            ops.append(v2.MixUp(alpha=mixup))
        if cutmix > 0:
            ops.append(v2.CutMix(alpha=cutmix))
        self.mix: v2.Transform | None = ops[0] if len(ops) == 1 else None
        if len(ops) == 2:
            self.mix = v2.RandomChoice(ops, p=[1.0 - switch_prob, switch_prob])

    @property
    def active(self) -> bool:
        """Whether any batch gets mixed (an op is on and ``prob > 0``)."""
        return self.mix is not None and self.prob > 0

    def soft_targets(self, labels: Tensor) -> Tensor:
        """One-hot with label smoothing: ``1 - s + s/K`` on the label, ``s/K`` elsewhere."""
        off = self.label_smoothing / self.num_classes
        t = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        return t.scatter_(1, labels.long().unsqueeze(1), 1.0 - self.label_smoothing + off)

    def __call__(self, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mixed inputs (same shape) and soft targets ``(B, num_classes)``.

        Args:
            inputs: images ``(B, C, H, W)`` or clips ``(B, C, T, H, W)``; a clip gets one mixing
                coefficient and one cutmix box for all its frames.
            labels: class indices ``(B,)``.
        """
        targets = self.soft_targets(labels)
        if self.active and (self.prob >= 1 or torch.rand(()) < self.prob):
            # torchvision takes 4-D tensors as images and 5-D ones only as tv_tensors.Video;
            # both ops touch only the batch and the last two (H, W) axes, so the order of the
            # clip's C and T axes does not matter.
            x = tv_tensors.Video(inputs) if inputs.ndim == 5 else inputs
            x, targets = self.mix(x, targets)
            inputs = x.as_subclass(Tensor)
        return inputs, targets

    @staticmethod
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        """Soft-target cross-entropy, averaged over the batch (computed in float32)."""
        return F.cross_entropy(logits.float(), targets)
