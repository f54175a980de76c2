"""Parameter and FLOP (multiply-accumulate) counts, on the meta device so they are free."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on a meta tensor of ``input_shape``.

    ``torch.utils.flop_counter`` counts 2 FLOPs per MAC; papers and timm quote MACs as "FLOPs",
    so this returns half its total. The model may live on the meta device.
    """
    device = next(model.parameters()).device
    x = torch.empty(*input_shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2
