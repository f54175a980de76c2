"""Pooling attention with decomposed relative positions, as pure functions plus one module.

Shapes use ``B`` batch, ``nH`` heads, ``C`` head width, ``N`` tokens, and token grids
``thw = (T, H, W)`` (``T = 1`` for images). The rel-pos code is written with plain
``matmul``/``reshape``/``pad`` (no einsum, no in-place slice writes) so that it exports to ONNX
and compiles without graph breaks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvitv2.models.config import BlockSpec, MViTConfig

Grid = tuple[int, int, int]


def rel_pos_index(q_size: int, k_size: int, device: torch.device | None = None) -> Tensor:
    """Indices ``(q_size, k_size)`` into a table of length ``2 * max(q_size, k_size) - 1``.

    Distances are measured on the finer of the two grids, as in every released MViTv2 codebase.
    """
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=device)[:, None] * q_ratio
    k_coords = torch.arange(k_size, device=device)[None, :] * k_ratio
    return (q_coords - k_coords + (k_size - 1) * k_ratio).long()


def resize_rel_pos(table: Tensor, length: int) -> Tensor:
    """Linearly interpolate a ``(L, C)`` rel-pos table to ``(length, C)``."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.t()[None], size=length, mode="linear")[0].t()


def get_rel_pos(q_size: int, k_size: int, table: Tensor) -> Tensor:
    """Relative embeddings ``(q_size, k_size, C)`` for one axis, resizing the table if needed."""
    table = resize_rel_pos(table, 2 * max(q_size, k_size) - 1)
    return table[rel_pos_index(q_size, k_size, table.device)]


def rel_pos_bias(
    q: Tensor,
    q_thw: Grid,
    k_thw: Grid,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    rel_pos_t: Tensor | None = None,
) -> Tensor:
    """Decomposed relative-position term of the attention scores.

    Args:
        q: unscaled queries ``(B, nH, qt*qh*qw, C)``, spatial tokens only.
        q_thw: query grid. k_thw: key grid.
        rel_pos_h, rel_pos_w, rel_pos_t: tables ``(L, C)``; ``rel_pos_t`` may be None when
            ``qt == kt == 1``.

    Returns:
        ``(B, nH, Nq, Nk)`` with ``bias[i, j] = q_i . (R_h[h(i), h(j)] + R_w[w(i), w(j)]
        + R_t[t(i), t(j)])``.
    """
    B, nH, _, C = q.shape
    qt, qh, qw = q_thw
    kt, kh, kw = k_thw
    r = q.reshape(B, nH, qt, qh, qw, C)
    # Batched over the query row (qh) / column (qw) / time (qt) the table slice depends on.
    rel_h = r @ get_rel_pos(qh, kh, rel_pos_h).transpose(1, 2)  # (B, nH, qt, qh, qw, kh)
    rel_w = (r.transpose(3, 4) @ get_rel_pos(qw, kw, rel_pos_w).transpose(1, 2)).transpose(3, 4)
    bias = (rel_h[..., :, None] + rel_w[..., None, :])[..., None, :, :]  # (..., 1, kh, kw)
    if rel_pos_t is not None:
        rt = get_rel_pos(qt, kt, rel_pos_t).transpose(1, 2)  # (qt, C, kt)
        rel_t = (r.reshape(B, nH, qt, qh * qw, C) @ rt).reshape(B, nH, qt, qh, qw, kt)
        bias = bias + rel_t[..., None, None]
    elif kt != 1:
        bias = bias.expand(*bias.shape[:5], kt, kh, kw)
    return bias.reshape(B, nH, qt * qh * qw, kt * kh * kw)


def pool_tokens(
    x: Tensor, thw: Grid, pool: nn.Module, num_prefix: int, spatial_only: bool
) -> tuple[Tensor, Grid]:
    """Apply a conv/pool module to the grid tokens of ``x`` and keep prefix (cls) tokens.

    Args:
        x: ``(..., N, C)`` with ``N = num_prefix + T*H*W`` tokens.
        thw: the token grid.
        pool: a 2-D module when ``spatial_only`` (``T`` must be 1), else a 3-D one.
        num_prefix: leading tokens that skip pooling (the cls token).

    Returns:
        pooled tokens ``(..., num_prefix + T'*H'*W', C)`` and the new grid.
    """
    lead = x.shape[:-2]
    C = x.shape[-1]
    prefix, grid = x[..., :num_prefix, :], x[..., num_prefix:, :]
    grid = grid.reshape(-1, *thw, C)
    if spatial_only:
        grid = pool(grid[:, 0].permute(0, 3, 1, 2)).unsqueeze(2)
    else:
        grid = pool(grid.permute(0, 4, 1, 2, 3))
    new_thw = (grid.shape[2], grid.shape[3], grid.shape[4])
    grid = grid.flatten(2).transpose(1, 2).reshape(*lead, -1, C)
    if num_prefix:
        grid = torch.cat((prefix, grid), dim=-2)
    return grid, new_thw


def window_partition(x: Tensor, hw: tuple[int, int], window: int) -> tuple[Tensor, tuple[int, int]]:
    """Split ``(B, nH, H*W, C)`` tokens into zero-padded windows ``(B*nW, nH, window**2, C)``.

    Returns the windows and the padded grid size.
    """
    B, nH, _, C = x.shape
    H, W = hw
    x = x.reshape(B, nH, H, W, C)
    pad_h, pad_w = (-H) % window, (-W) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.reshape(B, nH, Hp // window, window, Wp // window, window, C)
    x = x.permute(0, 2, 4, 1, 3, 5, 6).reshape(-1, nH, window * window, C)
    return x, (Hp, Wp)


def window_unpartition(
    x: Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, nH, window**2, C)`` -> ``(B, nH, H*W, C)``."""
    Hp, Wp = padded_hw
    H, W = hw
    nWh, nWw = Hp // window, Wp // window
    _, nH, _, C = x.shape
    x = x.reshape(-1, nWh, nWw, nH, window, window, C).permute(0, 3, 1, 4, 2, 5, 6)
    x = x.reshape(-1, nH, Hp, Wp, C)[:, :, :H, :W]
    return x.reshape(-1, nH, H * W, C)


def _pool_conv(spatial_only: bool, dim: int, kernel: Grid, stride: Grid) -> nn.Module:
    """Depthwise pooling conv shared by all heads (``groups = head width``)."""
    if spatial_only:
        return nn.Conv2d(
            dim, dim, kernel[1:], stride=stride[1:], padding=[k // 2 for k in kernel[1:]],
            groups=dim, bias=False,
        )  # fmt: skip
    return nn.Conv3d(
        dim, dim, kernel, stride=stride, padding=[k // 2 for k in kernel], groups=dim, bias=False
    )


class MultiScaleAttention(nn.Module):
    """Pooling attention: Q/K/V pooled by depthwise convs, decomposed rel-pos, residual pooling.

    Built from a :class:`BlockSpec` (widths, heads, strides, window) and the model config
    (cls token, rel-pos and residual-pooling switches).
    """

    def __init__(self, spec: BlockSpec, cfg: MViTConfig) -> None:
        super().__init__()
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

        self.qkv = nn.Linear(spec.dim, 3 * spec.attn_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(spec.attn_dim, spec.attn_dim)
        norm = nn.LayerNorm
        kernel = tuple(cfg.pool_kernel)
        self.pool_q = self.norm_q = None
        if spec.pool_q:
            self.pool_q = _pool_conv(self.spatial_only, head_dim, kernel, spec.stride_q)
            self.norm_q = norm(head_dim, eps=cfg.norm_eps)
        self.pool_k = _pool_conv(self.spatial_only, head_dim, kernel, spec.stride_kv)
        self.norm_k = norm(head_dim, eps=cfg.norm_eps)
        self.pool_v = _pool_conv(self.spatial_only, head_dim, kernel, spec.stride_kv)
        self.norm_v = norm(head_dim, eps=cfg.norm_eps)

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

    def _pool(self, x: Tensor, thw: Grid, pool: nn.Module | None, norm: nn.Module | None):
        if pool is None:
            return x, thw
        x, thw = pool_tokens(x, thw, pool, self.num_prefix, self.spatial_only)
        return norm(x), thw

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, q_thw: Grid, k_thw: Grid) -> Tensor:
        """Scaled dot-product attention of ``(B, nH, N, C)`` tensors plus the rel-pos term."""
        bias = None
        if self.rel_pos_h is not None:
            p = self.num_prefix
            bias = rel_pos_bias(
                q[:, :, p:], q_thw, k_thw, self.rel_pos_h, self.rel_pos_w, self.rel_pos_t
            )
            if p:  # no rel-pos on rows/columns of the cls token
                bias = F.pad(bias, (p, 0, p, 0))
            bias = bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)

    def forward(self, x: Tensor, thw: Grid) -> tuple[Tensor, Grid]:
        """x: ``(B, N, C_in)`` tokens on grid ``thw``. Returns ``(B, N', C_out)`` and its grid."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, q_thw = self._pool(q, thw, self.pool_q, self.norm_q)
        k, k_thw = self._pool(k, thw, self.pool_k, self.norm_k)
        v, _ = self._pool(v, thw, self.pool_v, self.norm_v)

        if self.window:
            q_win = self.window // self.stride_q[1]
            kv_win = self.window // self.stride_kv[1]
            qw, padded = window_partition(q, q_thw[1:], q_win)
            kw, _ = window_partition(k, k_thw[1:], kv_win)
            vw, _ = window_partition(v, k_thw[1:], kv_win)
            out = self._attend(qw, kw, vw, (1, q_win, q_win), (1, kv_win, kv_win))
            out = window_unpartition(out, q_win, padded, q_thw[1:])
        else:
            out = self._attend(q, k, v, q_thw, k_thw)

        if self.residual_pooling:
            if self.num_prefix and not self.residual_pooling_cls:
                p = self.num_prefix
                out = torch.cat((out[:, :, :p], out[:, :, p:] + q[:, :, p:]), dim=2)
            else:
                out = out + q
        out = out.transpose(1, 2).reshape(B, -1, self.dim_out)
        return self.proj(out), q_thw
