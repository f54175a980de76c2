"""Exponential moving average of the weights (optional; off in the paper's ImageNet recipe)."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (buffers averaged too); call ``update_parameters(model)`` per step.

    Args:
        model: the unwrapped model (not DDP / compiled).
        decay: weight of the old average per step, e.g. 0.9999.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema
