"""Decomposed relative positions (MViTv2 Sec. 4.1), as short pure functions.

The rel-pos term of the score between query ``i`` and key ``j`` on grids ``(T, H, W)`` is
``q_i . (R_h[h(i), h(j)] + R_w[w(i), w(j)] + R_t[t(i), t(j)])`` with one learned table per axis.
Written with plain ``matmul``/``reshape``/``pad``/``cat`` (no einsum, no in-place slice writes)
so that it exports to ONNX and compiles without graph breaks. Shapes: ``B`` batch, ``nH`` heads,
``C`` head width, grids ``thw = (T, H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mvitv2.ops.context import tracing
from mvitv2.ops.kept import kept, once_per_arguments

Grid = tuple[int, int, int]


def rel_pos_index(
    q_size: int | Tensor, k_size: int | Tensor, device: torch.device | None = None
) -> Tensor:
    """Indices ``(q_size, k_size)`` into a table of length ``2 * max(q_size, k_size) - 1``.

    Distances are measured on the finer of the two grids, as in every released MViTv2 codebase,
    whose ``arange * ratio`` products are float32. The sizes may be 0-d tensors (TorchScript's
    tracer gives a grid's sizes so): the ratios are tensor ops, so a traced graph computes the
    indices of the grid it is given rather than keeping the traced one's.
    """
    q = torch.as_tensor(q_size, dtype=torch.float64, device=device)
    k = torch.as_tensor(k_size, dtype=torch.float64, device=device)
    q_ratio, k_ratio = (k / q).clamp(min=1.0), (q / k).clamp(min=1.0)
    q_coords = torch.arange(q_size, device=device)[:, None] * q_ratio.float()
    k_coords = torch.arange(k_size, device=device)[None, :] * k_ratio.float()
    return (q_coords - k_coords + ((k - 1) * k_ratio).float()).long()


def resize_rel_pos(table: Tensor, length: int | Tensor) -> Tensor:
    """Linearly interpolate a ``(L, C)`` rel-pos table to ``(length, C)`` (a tensor ``length``
    while tracing: always interpolated, which leaves a table of that length unchanged)."""
    if isinstance(length, int) and table.shape[0] == length:
        return table
    return F.interpolate(table.t()[None], size=(length,), mode="linear")[0].t()


# The indices depend only on the sizes, so eager code keeps them: making them was 432 of
# MViTv2-S's ~2,500 ops per forward (~2 ms of its 250 ms bf16 clip, Intel Xeon 2 threads).
@once_per_arguments(maxsize=256)
def _kept_index(q_size: int, k_size: int, device: torch.device) -> Tensor:
    """:func:`rel_pos_index`, made once per sizes and device in eager code."""
    return rel_pos_index(q_size, k_size, device)


def get_rel_pos(q_size: int, k_size: int, table: Tensor) -> Tensor:
    """Relative embeddings ``(q_size, k_size, C)`` for one axis, resizing the table if needed."""
    if torch.jit.is_tracing():
        # The sizes are graph values there (the whole-detector ONNX export): Python's ``max``
        # and a kept index would fix the table length and the indices at the traced grid.
        sizes = torch.as_tensor(q_size), torch.as_tensor(k_size)
        length: int | Tensor = 2 * torch.maximum(*sizes) - 1
        index = rel_pos_index(q_size, k_size, table.device)
    else:
        length = 2 * max(q_size, k_size) - 1
        index = _kept_index(q_size, k_size, table.device)
    return resize_rel_pos(table, length)[index]


class RelPos:
    """The rel-pos tables ``(L, C)`` of one attention (``t`` None: no temporal term) and the
    query/key grids they are used on; the first ``num_prefix`` tokens (cls) get no term."""

    def __init__(
        self, h: Tensor, w: Tensor, t: Tensor | None, q_thw: Grid, k_thw: Grid, num_prefix: int
    ) -> None:
        self.h, self.w, self.t = h, w, t
        self.q_thw, self.k_thw = q_thw, k_thw
        self.num_prefix = num_prefix

    def num_terms(self) -> int:
        """Coefficients per query of the folded form: ``kh + kw`` (``+ kt``)."""
        kt, kh, kw = self.k_thw
        return kh + kw + (kt if self.t is not None else 0)


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
    rh, rw = get_rel_pos(qh, kh, rel_pos_h), get_rel_pos(qw, kw, rel_pos_w)
    rt = None if rel_pos_t is None else get_rel_pos(qt, kt, rel_pos_t)
    bias = bias_from_coeffs(*rel_coeffs(q.reshape(B, nH, qt, qh, qw, C), rh, rw, rt), k_thw)
    return bias.reshape(B, nH, qt * qh * qw, kt * kh * kw)


def rel_coeffs(
    r: Tensor, rh: Tensor, rw: Tensor, rt: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-axis rel-pos coefficients of the query grid ``r`` ``(B, nH, qt, qh, qw, C)``.

    Args:
        r: queries on their grid.
        rh, rw, rt: gathered tables ``(qh, kh, C)``, ``(qw, kw, C)``, ``(qt, kt, C)`` (or None).

    Returns:
        ``(a_h, a_w, a_t)`` (``a_t`` None without ``rt``), each ``(B, nH, qt, qh, qw, k)`` with
        ``a_h[..., y, x, j] = r[..., y, x, :] . rh[y, j]`` etc.: matmuls batched over the axis
        the table slice depends on.
    """
    B, nH, qt, qh, qw, C = r.shape
    if not tracing() and _token_major(r):
        return _token_major_coeffs(r, rh, rw, rt)
    a_h = r @ rh.transpose(1, 2)
    a_w = (r.transpose(3, 4) @ rw.transpose(1, 2)).transpose(3, 4)
    if rt is None:
        return a_h, a_w, None
    a_t = (r.reshape(B, nH, qt, qh * qw, C) @ rt.transpose(1, 2)).view(*a_h.shape[:5], -1)
    return a_h, a_w, a_t


def _token_major(r: Tensor) -> bool:
    """Whether the query grid ``r`` ``(B, nH, qt, qh, qw, C)`` lies token-major with the heads
    innermost, i.e. views as ``(B*qt*qh, qw*nH, C)`` matrices (:func:`_token_major_coeffs`)."""
    B, nH, qt, qh, qw, C = r.shape
    try:
        r.permute(0, 2, 3, 4, 1, 5).view(B * qt * qh, qw * nH, C)
    except RuntimeError:  # its strides allow no such view
        return False
    return True


def _token_major_coeffs(
    r: Tensor, rh: Tensor, rw: Tensor, rt: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`rel_coeffs` of a query grid that lies token-major with the heads innermost, as
    attention gets it (``(B, N, nH, C)`` memory under its ``(B, nH, N, C)`` view): each term is
    one batched GEMM over the table's axis on ``r`` as it lies. The broadcast matmuls copy such
    an ``r`` first (for ``a_w`` transposed): the three terms took 1.2-2.6x as long on MViTv2's
    shapes (2 threads, Intel Xeon 207). Only the small tables are expanded over batch axes."""
    B, nH, qt, qh, qw, C = r.shape
    mem = r.permute(0, 2, 3, 4, 1, 5)  # (B, qt, qh, qw, nH, C): r's memory order

    def to_grid(a: Tensor) -> Tensor:  # a product in memory order -> (B, nH, qt, qh, qw, k)
        return a.view(B, qt, qh, qw, nH, -1).permute(0, 4, 1, 2, 3, 5)

    # a_h: batches (b, t, y), rows (x, head), the table row of y
    w_h = rh.transpose(1, 2).expand(B, qt, qh, C, -1).reshape(B * qt * qh, C, -1)
    a_h = to_grid(torch.bmm(mem.reshape(B * qt * qh, qw * nH, C), w_h))
    # a_w: batches (x, head), rows (b, t, y), the table row of x
    rows = r.permute(4, 1, 0, 2, 3, 5).reshape(qw * nH, B * qt * qh, C)
    w_w = rw.transpose(1, 2)[:, None].expand(qw, nH, C, -1).reshape(qw * nH, C, -1)
    a_w = torch.bmm(rows, w_w).view(qw, nH, B, qt, qh, -1).permute(2, 1, 3, 4, 0, 5)
    if rt is None:
        return a_h, a_w, None
    # a_t: batches (b, t), rows (y, x, head), the table row of t
    w_t = rt.transpose(1, 2).expand(B, qt, C, -1).reshape(B * qt, C, -1)
    a_t = to_grid(torch.bmm(mem.reshape(B * qt, qh * qw * nH, C), w_t))
    return a_h, a_w, a_t


def bias_from_coeffs(a_h: Tensor, a_w: Tensor, a_t: Tensor | None, k_thw: Grid) -> Tensor:
    """The rel-pos bias ``(..., kt*kh*kw)`` of per-query coefficients ``a_h (..., kh)``,
    ``a_w (..., kw)``, ``a_t (..., kt)`` (None: no temporal term), broadcast over the key grid."""
    kt, kh, kw = k_thw
    bias = (a_h[..., :, None] + a_w[..., None, :])[..., None, :, :]  # (..., 1, kh, kw)
    if a_t is not None:
        bias = bias + a_t[..., None, None]
    elif kt != 1:
        bias = bias.expand(*bias.shape[:-3], kt, kh, kw)
    return bias.flatten(-3)


def rel_pos_terms(
    q: Tensor,
    q_thw: Grid,
    k_thw: Grid,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    rel_pos_t: Tensor | None = None,
    factor: float = 1.0,
) -> Tensor:
    """Per-query rel-pos coefficients ``[a_h, a_w(, a_t)]``, the folded form of the rel-pos term.

    Args:
        q: unscaled queries ``(B, nH, qt*qh*qw, C)``, spatial tokens only.
        q_thw, k_thw, rel_pos_h, rel_pos_w, rel_pos_t: as in :func:`rel_pos_bias`.
        factor: multiplies the result (``1/scale`` folds the softmax scale in for free: it is
            applied to the small gathered tables, not to the coefficients).

    Returns:
        ``(B, nH, Nq, kh + kw (+ kt))`` with ``a_h[i, y] = q_i . R_h[h(i), y]`` etc., so that
        ``rel_pos_bias(...)[i, j] == factor**-1 * (a[i] . rel_pos_onehots(k_thw)[j])``.
    """
    B, nH, _, C = q.shape
    qt, qh, qw = q_thw
    kt, kh, kw = k_thw
    rh = _scaled_rel_pos(qh, kh, rel_pos_h, factor)
    rw = _scaled_rel_pos(qw, kw, rel_pos_w, factor)
    rt = None if rel_pos_t is None else _scaled_rel_pos(qt, kt, rel_pos_t, factor)
    return terms_from_gathered(q.reshape(B, nH, qt, qh, qw, C), rh, rw, rt)


def _scaled_rel_pos(q_size: int, k_size: int, table: Tensor, factor: float) -> Tensor:
    """``get_rel_pos(q_size, k_size, table) * factor``, kept across inference calls."""
    return kept(
        "rel_pos",
        (q_size, k_size, factor),
        lambda t: get_rel_pos(q_size, k_size, t) * factor,
        table,
    )


def terms_from_gathered(r: Tensor, rh: Tensor, rw: Tensor, rt: Tensor | None) -> Tensor:
    """:func:`rel_pos_terms` of the query grid ``r`` ``(B, nH, qt, qh, qw, C)`` with already
    gathered tables (see :func:`rel_coeffs`); returns ``(B, nH, qt*qh*qw, kh + kw (+ kt))``."""
    B, nH, qt, qh, qw, _ = r.shape
    parts = [a for a in rel_coeffs(r, rh, rw, rt) if a is not None]
    return torch.cat(parts, dim=-1).reshape(B, nH, qt * qh * qw, -1)


def rel_pos_onehots(
    k_thw: Grid,
    temporal: bool,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Key-side one-hots ``(kt*kh*kw, kh + kw (+ kt))`` matching :func:`rel_pos_terms`."""
    kt, kh, kw = k_thw
    eye_h = torch.eye(kh, device=device, dtype=dtype)[None, :, None].expand(kt, kh, kw, kh)
    eye_w = torch.eye(kw, device=device, dtype=dtype)[None, None].expand(kt, kh, kw, kw)
    parts = [eye_h, eye_w]
    if temporal:
        parts.append(
            torch.eye(kt, device=device, dtype=dtype)[:, None, None].expand(kt, kh, kw, kt)
        )
    return torch.cat(parts, dim=-1).reshape(kt * kh * kw, -1)


# A detector sees a new key grid per image size in its global blocks (~0.3 MB each at 1024
# px): at most 64 are kept.
@once_per_arguments(maxsize=64)
def key_onehots(
    k_thw: Grid,
    temporal: bool,
    num_prefix: int,
    device: torch.device,
    dtype: torch.dtype,
    extra: int = 0,
) -> Tensor:
    """:func:`rel_pos_onehots` after ``num_prefix`` zero rows (prefix keys get no rel-pos term)
    and before ``extra`` zero columns, made once per arguments in eager code."""
    return F.pad(rel_pos_onehots(k_thw, temporal, device, dtype), (0, extra, num_prefix, 0))


def folded_keys(k: Tensor, k_thw: Grid, temporal: bool, num_prefix: int, extra: int = 0) -> Tensor:
    """The keys ``(B, nH, Nk, C)`` of the folded rel-pos form, ``[k, onehots]`` ``(B, nH, Nk,
    C + kh + kw (+ kt) + extra)`` with the one-hots of :func:`key_onehots` (zeros for the
    ``num_prefix`` prefix keys and in the ``extra`` columns): one copy, contiguous."""
    onehots = key_onehots(k_thw, temporal, num_prefix, k.device, k.dtype, extra)
    return torch.cat((k, onehots.expand(*k.shape[:2], -1, -1)), dim=-1)
