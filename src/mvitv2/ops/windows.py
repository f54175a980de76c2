"""Window partition of token grids (the detection backbone's hybrid window attention).

:func:`window_partition` cuts an ``H x W`` token grid into zero-padded square windows and
:func:`window_unpartition` puts them back (dropping the padding, optionally adding the residual
in the same pass). Written plainly (pad, reshape, permute, crop) that is three full copies each
way; here each direction is one strided copy per block of whole or partial windows, and only the
padding is zeroed. The two directions are each other's adjoint, so each one's backward is the
other. The plain ops remain as the unfused baseline and for tracing (compile, export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mvitv2.ops.context import tracing


def _blocks(n: int, window: int) -> list[tuple[slice, slice, int]]:
    """Cover ``n`` tokens with windows of ``window``: per block of windows, its token slice, its
    window-index slice and the tokens each of its windows holds (whole windows, then the partial
    last one)."""
    whole, part = divmod(n, window)
    blocks = [(slice(whole * window), slice(whole), window)]  # empty where n < window
    if part:
        blocks.append((slice(whole * window, None), slice(whole, None), part))
    return blocks


def _split(t: Tensor, n_lead: int, rows: int, cols: int) -> Tensor:
    """``(B, *lead, nh*rows, nw*cols, *rest)`` -> ``(B, *lead, nh, rows, nw, cols, *rest)``."""
    return t.unflatten(n_lead + 1, (-1, rows)).unflatten(n_lead + 3, (-1, cols))


def _to_windows(grid: Tensor, n_lead: int, window: int) -> Tensor:
    """``(B, *lead, H, W, *rest)`` -> ``(B, nWh, nWw, *lead, window, window, *rest)``, zero padded
    at the bottom and right."""
    H, W = grid.shape[n_lead + 1 : n_lead + 3]
    B, lead, rest = grid.shape[0], grid.shape[1 : n_lead + 1], grid.shape[n_lead + 3 :]
    nh, nw = -(-H // window), -(-W // window)
    out = grid.new_empty(B, nh, nw, *lead, window, window, *rest)
    keep = (slice(None),) * n_lead
    # grid axes of a block: 0 B, 1..n lead, n+1 windows on H, n+2 rows, n+3 windows on W, n+4 cols
    perm = (0, n_lead + 1, n_lead + 3, *range(1, n_lead + 1), n_lead + 2, n_lead + 4)
    perm += tuple(range(n_lead + 5, n_lead + 5 + len(rest)))
    for hs, hi, rows in _blocks(H, window):
        for ws, wi, cols in _blocks(W, window):
            src = _split(grid[(slice(None), *keep, hs, ws)], n_lead, rows, cols)
            out[(slice(None), hi, wi, *keep, slice(rows), slice(cols))].copy_(src.permute(perm))
    if H % window:
        out[(slice(None), -1, slice(None), *keep, slice(H % window, None))].zero_()
    if W % window:
        out[(slice(None), slice(None), -1, *keep, slice(None), slice(W % window, None))].zero_()
    return out


def _from_windows(
    windows: Tensor, n_lead: int, hw: tuple[int, int], residual: Tensor | None
) -> Tensor:
    """``(B, nWh, nWw, *lead, w, w, *rest)`` -> ``(B, *lead, H, W, *rest)`` (+ ``residual``, of
    that shape), the padding dropped."""
    B, lead, window = windows.shape[0], windows.shape[3 : n_lead + 3], windows.shape[n_lead + 3]
    rest = windows.shape[n_lead + 5 :]
    H, W = hw
    dtype = windows.dtype if residual is None else torch.result_type(windows, residual)
    out = windows.new_empty(B, *lead, H, W, *rest, dtype=dtype)
    keep = (slice(None),) * n_lead
    # window axes: 0 B, 1 windows on H, 2 windows on W, 3..n+2 lead, n+3 rows, n+4 cols
    perm = (0, *range(3, n_lead + 3), 1, n_lead + 3, 2, n_lead + 4)
    perm += tuple(range(n_lead + 5, n_lead + 5 + len(rest)))
    for hs, hi, rows in _blocks(H, window):
        for ws, wi, cols in _blocks(W, window):
            src = windows[(slice(None), hi, wi, *keep, slice(rows), slice(cols))]
            src = src.permute(perm)  # (B, *lead, nh, rows, nw, cols, *rest)
            region = (slice(None), *keep, hs, ws)
            dst = _split(out[region], n_lead, rows, cols)
            if residual is None:
                dst.copy_(src)
            else:
                torch.add(src, _split(residual[region], n_lead, rows, cols), out=dst)
    return out


class _ToWindows(torch.autograd.Function):
    """:func:`_to_windows`; its gradient is :func:`_from_windows` of the windows' gradient."""

    @staticmethod
    def forward(ctx, grid, n_lead, window):  # noqa: D102
        ctx.n_lead, ctx.hw = n_lead, tuple(grid.shape[n_lead + 1 : n_lead + 3])
        return _to_windows(grid, n_lead, window)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        return _FromWindows.apply(dy, ctx.n_lead, ctx.hw, None), None, None


class _FromWindows(torch.autograd.Function):
    """:func:`_from_windows`; its gradients are :func:`_to_windows` of the grid's gradient (zero
    on the padding) and, for the residual, the grid's gradient itself."""

    @staticmethod
    def forward(ctx, windows, n_lead, hw, residual):  # noqa: D102
        ctx.n_lead, ctx.window = n_lead, windows.shape[n_lead + 3]
        ctx.residual = residual is not None
        return _from_windows(windows, n_lead, hw, residual)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        # (autograd casts each gradient to its input's dtype)
        dx = _ToWindows.apply(dy, ctx.n_lead, ctx.window)
        return dx, None, None, dy if ctx.residual else None


def window_partition(
    x: Tensor, hw: tuple[int, int], window: int, token_dim: int = -2, plain: bool = False
) -> tuple[Tensor, tuple[int, int]]:
    """Split the ``H*W`` tokens (axis ``token_dim``) of ``x`` into zero-padded windows.

    Args:
        x: ``(B, *lead, H*W, *rest)``, e.g. ``(B, nH, H*W, C)`` (``token_dim=-2``) or
            ``(B, H*W, nH, C)`` (``token_dim=1``).
        hw: the token grid ``(H, W)``.
        window: the window side.
        plain: pad, split and permute with standard ops (three copies, as detectron2; the
            unfused baseline), as always while tracing.

    Returns:
        ``(B*nW, *lead, window**2, *rest)`` (windows in row-major order per image) and the
        padded grid ``(Hp, Wp)``.
    """
    d = token_dim % x.dim()
    B, lead, rest = x.shape[0], x.shape[1:d], x.shape[d + 1 :]
    H, W = hw
    pad_h, pad_w = (-H) % window, (-W) % window
    Hp, Wp = H + pad_h, W + pad_w
    if plain or tracing():
        x = x.reshape(B, *lead, H, W, rest.numel())
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        x = x.reshape(B, *lead, Hp // window, window, Wp // window, window, rest.numel())
        n = len(lead)  # axes: 0 B, 1..n lead, n+1 nWh, n+2 wh, n+3 nWw, n+4 ww, n+5 rest
        windows = x.permute(0, n + 1, n + 3, *range(1, n + 1), n + 2, n + 4, n + 5)
    else:
        windows = _ToWindows.apply(x.unflatten(d, (H, W)), len(lead), window)
    return windows.reshape(-1, *lead, window * window, *rest), (Hp, Wp)


def window_unpartition(
    x: Tensor,
    window: int,
    padded_hw: tuple[int, int],
    hw: tuple[int, int],
    token_dim: int = -2,
    residual: Tensor | None = None,
    plain: bool = False,
) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, *lead, window**2, *rest)`` ->
    ``(B, *lead, H*W, *rest)``, the padding dropped; plus ``residual`` (that shape) if given,
    added in the same pass (with ``plain``: permute, crop, add, as detectron2)."""
    d = token_dim % x.dim()
    lead, rest = x.shape[1:d], x.shape[d + 1 :]
    (Hp, Wp), (H, W) = padded_hw, hw
    if plain or tracing():
        x = x.reshape(-1, Hp // window, Wp // window, *lead, window, window, rest.numel())
        n = len(lead)  # axes: 0 B, 1 nWh, 2 nWw, 3..n+2 lead, n+3 wh, n+4 ww, n+5 rest
        x = x.permute(0, *range(3, n + 3), 1, n + 3, 2, n + 4, n + 5)
        x = x.reshape(-1, *lead, Hp, Wp, rest.numel())[..., :H, :W, :]
        out = x.reshape(x.shape[0], *lead, H * W, *rest)
        return out if residual is None else out + residual
    windows = x.reshape(-1, Hp // window, Wp // window, *lead, window, window, *rest)
    grid_res = None if residual is None else residual.unflatten(d, (H, W))
    return _FromWindows.apply(windows, len(lead), (H, W), grid_res).flatten(d, d + 1)
