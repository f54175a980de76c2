"""Parameter and FLOP (multiply-accumulate) counts, on the meta device so they are free."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters())


def macs_of(fn: Callable[..., T], *args: object) -> tuple[int, T]:
    """Multiply-accumulates of ``fn(*args)`` (no grad) and its result.

    ``torch.utils.flop_counter`` counts 2 FLOPs per MAC; papers and timm quote MACs as "FLOPs",
    so this returns half its total (oneDNN's GEMMs included: :mod:`mvitv2.ops.gemm` registers
    their formula).
    """
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = fn(*args)
    return counter.get_total_flops() // 2, out


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on an empty tensor of ``input_shape`` (see
    :func:`macs_of`). The model may live on the meta device."""
    device = next(model.parameters()).device
    return macs_of(model, torch.empty(*input_shape, device=device))[0]
