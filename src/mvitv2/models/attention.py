"""Pooling attention (MViTv2, Li et al. 2022, Sec. 4): Q, K, V pooled by depthwise convs,
decomposed relative positions, residual pooling.

The forward reads as the paper: project to Q, K, V and pool them (:func:`mvitv2.ops.pool_qkv`),
optionally split into windows (the detection backbone's hybrid window attention), attend with
the rel-pos term (:func:`mvitv2.ops.attend`, on the path chosen by
:func:`mvitv2.ops.set_attention_impl`), add the pooled queries back, project. How each step is
computed fast and in little memory lives in :mod:`mvitv2.ops`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mvitv2.models.config import BlockSpec, MViTConfig
from mvitv2.ops import (
    Linear,
    RelPos,
    add_residual_after_prefix,
    attend,
    get_attention_impl,
    pool_qkv,
    resolve_attention_impl,
    window_partition,
    window_unpartition,
)
from mvitv2.ops.rel_pos import Grid


def _pool_conv(spatial_only: bool, dim: int, kernel: Grid, stride: Grid) -> nn.Module:
    """Depthwise pooling conv shared by all heads (``groups = head width``), "same" padding."""
    if spatial_only:
        pad = [k // 2 for k in kernel[1:]]
        return nn.Conv2d(dim, dim, kernel[1:], stride[1:], pad, groups=dim, bias=False)
    pad = [k // 2 for k in kernel]
    return nn.Conv3d(dim, dim, kernel, stride, pad, groups=dim, bias=False)


class MultiScaleAttention(nn.Module):
    """Pooling attention: Q/K/V pooled by depthwise convs, decomposed rel-pos, residual pooling.

    Built from a :class:`BlockSpec` (widths, heads, strides, window) and the model config
    (cls token, rel-pos and residual-pooling switches). ``attn_impl`` (None: the global
    :func:`mvitv2.ops.set_attention_impl` setting) selects the attention path for this module.
    """

    def __init__(self, spec: BlockSpec, cfg: MViTConfig) -> None:
        super().__init__()
        self.attn_impl: str | None = None
        self.num_heads = spec.num_heads
        self.dim_out = spec.attn_dim
        head_dim = spec.attn_dim // spec.num_heads
        self.scale = head_dim**-0.5
        self.num_prefix = int(cfg.use_cls_token)
        self.spatial_only = not cfg.temporal
        self.residual_pooling = cfg.residual_pooling
        self.residual_pooling_cls = cfg.residual_pooling_cls
        self.window = spec.window
        self.stride_q = spec.stride_q
        self.stride_kv = spec.stride_kv

        self.qkv = Linear(spec.dim, 3 * spec.attn_dim, bias=cfg.qkv_bias)
        self.proj = Linear(spec.attn_dim, spec.attn_dim)
        kernel = tuple(cfg.pool_kernel)
        self.pool_q = self.norm_q = None
        if spec.pool_q:
            self.pool_q = _pool_conv(self.spatial_only, head_dim, kernel, spec.stride_q)
            self.norm_q = nn.LayerNorm(head_dim, eps=cfg.norm_eps)
        self.pool_k = _pool_conv(self.spatial_only, head_dim, kernel, spec.stride_kv)
        self.norm_k = nn.LayerNorm(head_dim, eps=cfg.norm_eps)
        self.pool_v = _pool_conv(self.spatial_only, head_dim, kernel, spec.stride_kv)
        self.norm_v = nn.LayerNorm(head_dim, eps=cfg.norm_eps)

        self.rel_pos_h = self.rel_pos_w = self.rel_pos_t = None
        if cfg.use_rel_pos:
            t, h, w = spec.input_grid
            q_size = [max(s // st, 1) for s, st in zip((t, h, w), spec.stride_q)]
            kv_size = [max(s // st, 1) for s, st in zip((t, h, w), spec.stride_kv)]
            lengths = [2 * max(a, b) - 1 for a, b in zip(q_size, kv_size)]
            self.rel_pos_h = nn.Parameter(torch.zeros(lengths[1], head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(lengths[2], head_dim))
            if cfg.temporal:
                self.rel_pos_t = nn.Parameter(torch.zeros(lengths[0], head_dim))

    def _rel(self, q_thw: Grid, k_thw: Grid, num_prefix: int) -> RelPos | None:
        if self.rel_pos_h is None:
            return None
        return RelPos(self.rel_pos_h, self.rel_pos_w, self.rel_pos_t, q_thw, k_thw, num_prefix)

    def forward(self, x: Tensor, thw: Grid) -> tuple[Tensor, Grid]:
        """x: ``(B, N, C_in)`` tokens on grid ``thw``. Returns ``(B, N', C_out)`` and its grid."""
        impl = resolve_attention_impl(self.attn_impl or get_attention_impl(), x)
        pools = (self.pool_q, self.pool_k, self.pool_v)
        norms = (self.norm_q, self.norm_k, self.norm_v)
        plain = impl == "reference"  # the unfused baseline: plain ops for pooling and windows too
        # Q (B, Nq, nH, C), K and V (B, Nk, nH, C), pooled and normed per head.
        q, k, v, q_thw, k_thw = pool_qkv(
            x, thw, self.qkv, pools, norms, self.num_heads, self.num_prefix, plain
        )
        qa = q
        if self.window:  # windows of the pooled grids: Q's side w / stride_q, K/V's w / stride_kv
            q_win, kv_win = self.window // self.stride_q[1], self.window // self.stride_kv[1]
            qa, padded = window_partition(q, q_thw[1:], q_win, 1, plain)
            k, _ = window_partition(k, k_thw[1:], kv_win, 1, plain)
            v, _ = window_partition(v, k_thw[1:], kv_win, 1, plain)
            rel = self._rel((1, q_win, q_win), (1, kv_win, kv_win), 0)
        else:
            rel = self._rel(q_thw, k_thw, self.num_prefix)
        # attend works on (B, nH, N, C): transposed views, no copies.
        out = attend(
            qa.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, rel, impl
        )
        out = out.transpose(1, 2)  # (B, N, nH, C)
        # Residual pooling: + the pooled queries (onto the cls token only if residual_pooling_cls;
        # window attention has no cls token and adds them as it copies out of the windows).
        if self.window:
            residual = q if self.residual_pooling else None
            out = window_unpartition(out, q_win, padded, q_thw[1:], 1, residual, plain)
        elif self.residual_pooling:
            if self.num_prefix and not self.residual_pooling_cls:
                out = add_residual_after_prefix(q, out, self.num_prefix)
            else:
                out = out + q
        return self.proj(out.reshape(out.shape[0], -1, self.dim_out)), q_thw
