"""The transformer MLP ``fc2(gelu(fc1(x)))`` and the residual add, in less memory, same values.

Training (fp32, no autocast) recomputes the GELU in backward instead of saving its output;
inference runs large inputs in token chunks (:data:`MLP_CHUNK_ELEMENTS`) so that the
``(N, hidden)`` activation never exists at full size, with the exact GELU fused into ``fc1``'s
GEMM where the backend can. All exact (the same ops on the same values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvitv2.ops.context import autocast_dtype, tracing
from mvitv2.ops.gemm import grad_input, grad_weight, linear, uses_onednn

#: Hidden-activation elements per token chunk of the MLP at inference.
MLP_CHUNK_ELEMENTS = 1 << 22


def mlp(x: Tensor, fc1: nn.Linear, act: nn.GELU, fc2: nn.Linear) -> Tensor:
    """``fc2(act(fc1(x)))``, the values of the plain modules.

    Args:
        x: tokens ``(..., dim)``.
        fc1, act, fc2: the MLP's layers (``dim -> hidden``, GELU, ``hidden -> dim_out``).

    Returns:
        ``(..., dim_out)``.
    """
    if tracing():  # compile/export: the plain graph
        return fc2(act(fc1(x)))
    if torch.is_grad_enabled():
        if act.approximate == "none" and autocast_dtype(x.device.type) is None:
            return _MlpRecomputeGelu.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return fc2(act(fc1(x)))
    rows = max(MLP_CHUNK_ELEMENTS // fc1.out_features, 1)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= rows:
        return _mlp_inference(x, fc1, act, fc2)
    out = flat.new_empty(flat.shape[0], fc2.out_features)
    for r0 in range(0, flat.shape[0], rows):
        out[r0 : r0 + rows] = _mlp_inference(flat[r0 : r0 + rows], fc1, act, fc2)
    return out.view(*x.shape[:-1], -1)


def _mlp_inference(x: Tensor, fc1: nn.Linear, act: nn.GELU, fc2: nn.Linear) -> Tensor:
    if act.approximate == "none":  # exact GELU: fused into fc1's GEMM where possible
        return fc2(linear(x, fc1.weight, fc1.bias, gelu=True))
    return fc2(act(fc1(x)))


class _MlpRecomputeGelu(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` that saves only ``x`` and ``fc1(x)`` for backward and recomputes
    the GELU there (cheap), instead of also keeping the GELU output: one ``(N, hidden)``
    activation less per block during training, same gradients as autograd's. The GEMMs run on
    the backend of :mod:`mvitv2.ops.gemm`."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):  # noqa: D102
        ctx.onednn = uses_onednn(x)
        h = linear(x, w1, b1)
        ctx.save_for_backward(x, h, w1, w2)
        return linear(F.gelu(h), w2, b2)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, h, w1, w2 = ctx.saved_tensors
        onednn = ctx.onednn
        dy2 = dy.reshape(-1, dy.shape[-1])
        h2 = h.reshape(-1, h.shape[-1])
        need = ctx.needs_input_grad
        dx = dw1 = db1 = dw2 = db2 = None
        if need[3]:
            dw2 = grad_weight(dy2, F.gelu(h2), onednn)
        if need[4]:
            db2 = dy2.sum(0)
        dh = torch.ops.aten.gelu_backward(grad_input(dy2, w2, onednn), h2)
        if need[1]:
            dw1 = grad_weight(dh, x.reshape(-1, x.shape[-1]), onednn)
        if need[2]:
            db1 = dh.sum(0)
        if need[0]:
            dx = grad_input(dh, w1, onednn).view(x.shape)
        return dx, dw1, db1, dw2, db2


def add_residual(shortcut: Tensor, branch: Tensor) -> Tensor:
    """``shortcut + branch``; at inference added into ``branch`` in place (``branch`` must be a
    fresh tensor nobody else holds), so no new activation buffer is allocated. Under autocast a
    bf16 branch added onto the fp32 residual stream makes an fp32 sum, as in the plain modules
    (in place it rounded the stream to bf16: MViTv2-S video with random weights, mean error
    against fp32 0.0056, torchvision's 0.0049, 0.0042 with the fp32 sum); the branch is then cast
    and the shortcut added into the cast (the same sums: the mixed-dtype add casts into a
    temporary first, 20-30 % slower on MViTv2-S's shapes, Intel Xeon 2 threads)."""
    if torch.is_grad_enabled() or tracing():
        return shortcut + branch
    return branch.to(torch.result_type(shortcut, branch)).add_(shortcut)


def add_residual_after_prefix(shortcut: Tensor, branch: Tensor, num_prefix: int) -> Tensor:
    """``branch`` with ``shortcut`` added to every token after the first ``num_prefix`` (dim 1),
    which keep ``branch``'s values: residual pooling that skips the cls token. At inference one
    add over all tokens into a fresh token-major tensor, then the prefix rows put back (the same
    values as adding the sliced rows and concatenating, which wrote every token twice)."""
    p = num_prefix
    if torch.is_grad_enabled() or tracing():  # out-of-place ops for autograd and export
        return torch.cat((branch[:, :p], branch[:, p:] + shortcut[:, p:]), dim=1)
    dtype = torch.result_type(branch, shortcut)
    out = torch.add(branch, shortcut, out=shortcut.new_empty(shortcut.shape, dtype=dtype))
    out[:, :p] = branch[:, :p]
    return out
